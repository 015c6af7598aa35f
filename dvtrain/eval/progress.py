"""Progress and wall time of `dvtrain eval`'s long phases (each attack on each model, surrogate
training, black-box example generation, the transfer matrix, the ε sweep).

One tqdm bar per phase on the main process, counting images (so tqdm shows images/s and the ETA), and
the seconds each phase took, which `dvtrain eval` stores in results.json's "eval_provenance" and in
the W&B summary. Bars follow logging.progress and, like training's, appear only on a terminal; the
environment variable DVTRAIN_PROGRESS=1 shows them anywhere (logs, captured output).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from dvtrain.tracking import PROGRESS_ENV as FORCE_ENV  # one name for training and evaluation bars


class Phases:
    """Seconds per phase name (summed if a phase repeats), and a bar per phase when `show`."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, images: int | None = None) -> Iterator[tqdm]:
        """Time the block as phase `name`; yields a bar of `images` images (None: a bar that only shows the
        elapsed time) to `update(k)` as k more images are done."""
        disable = True if not self.show else (False if os.environ.get(FORCE_ENV) == "1" else None)
        bar = tqdm(total=images, desc=name, unit="img", disable=disable, file=sys.stderr, dynamic_ncols=True,
                   leave=True, mininterval=0.5)
        start = time.perf_counter()
        try:
            yield bar
        finally:
            bar.close()
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

