"""Where a step's time goes: seconds per phase (distill, all-gather, train), summed over an epoch.

Timing a GPU phase needs a synchronisation at each boundary, which costs throughput, so the timer is
a no-op unless `logging.step_timing` is on.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class PhaseTimer:
    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def summary(self) -> str:
        total = sum(self.seconds.values()) or 1.0
        return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in self.seconds.items())


DISABLED = PhaseTimer(False, torch.device("cpu"))
