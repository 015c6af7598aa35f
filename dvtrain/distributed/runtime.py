"""Where the run executes: one process, or one rank of a launch by `accelerate launch` or `torchrun`.

dvtrain decides the device itself: CUDA when present, else the CPU with the gloo backend. The
Accelerator is used only to join the launcher's process group and pick the rank's device; the
submodels are never passed to `accelerator.prepare`, which would wrap them in DDP and make the
different submodels of different ranks identical.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dvtrain.config import Config
from dvtrain.errors import DvtrainError

if TYPE_CHECKING:  # torch is imported where a function needs it: `dvtrain --help` must not wait for it
    import torch

    from dvtrain.distributed.placement import Placement


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DvtrainError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    """Rank 0 of a launch, or the only process; known from the launcher's environment before any process group."""
    return os.environ.get("RANK", "0") == "0"


def report_to_launcher(line: str) -> None:
    """Hand a one-line error to torchrun (its TORCHELASTIC_ERROR_FILE, in the format torch's elastic
    error handler writes), so the launcher's failure summary shows that line instead of "To enable
    traceback see ...". The file is written whole or not at all: torchrun reads it once the rank has
    exited, and a half-written one (a rank stopped by the launcher's SIGTERM mid-write) makes its agent
    fail on the JSON with no summary at all. Nothing happens outside a torchrun launch."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    from dvtrain import storage

    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        storage.write_atomic(Path(path), json.dumps(record), "torchrun's error file")
    except (OSError, DvtrainError):
        pass  # the line was printed already; the launcher then shows its generic summary


# How long a rank that refused alike waits for the launcher to stop it (see `wait_for_launcher_stop`): as long
# as torchrun itself gives a SIGTERMed rank before its SIGKILL, so the wait never outlasts the launcher's own.
LAUNCHER_STOP_WAIT_S = 30.0


def wait_for_launcher_stop() -> None:
    """On a rank other than 0 of a multi-process launch, after a refusal every rank reaches alike: wait
    until the launcher stops this rank (its SIGTERM, consumed here) or LAUNCHER_STOP_WAIT_S pass.

    Why: rank 0 alone prints such a refusal. Every rank reaches it at about the same moment, and torchrun
    SIGTERMs the other ranks as soon as the first one exits; if that first one is not rank 0, rank 0 is
    stopped before, while or after printing — seen as no line at all, "stopped by SIGTERM" instead of the
    refusal, or a half-written error file. Waiting here makes rank 0 the first to exit, so its line is
    printed once and is the root cause of torchrun's summary. Returns at once in one process."""
    import signal

    if launched_world_size() == 1 or is_main_rank():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending, not fatal, until consumed below
    signal.sigtimedwait({signal.SIGTERM}, LAUNCHER_STOP_WAIT_S)


def init_runtime(cfg: Config, whole_ensemble: bool = False) -> tuple[Placement, torch.device]:
    """Join the launcher's process group (if any); the placement of the submodels over the ranks, and
    this rank's device. `whole_ensemble`: every rank holds every submodel (`dvtrain eval`, which shares
    out test images instead), so the placement is local and any number of processes may be launched."""
    import torch

    from dvtrain.distributed.placement import LocalPlacement, ProcessGroupPlacement

    world = launched_world_size()
    if world == 1:
        return LocalPlacement(cfg.ensemble.size), resolve_device(cfg.device)
    if not whole_ensemble and world > cfg.ensemble.size and world % cfg.ensemble.size:
        raise DvtrainError(
            f"launched {world} processes for ensemble.size={cfg.ensemble.size}; launch at most "
            f"{cfg.ensemble.size} processes, or a multiple of {cfg.ensemble.size} (data-parallel replicas)"
        )
    from accelerate import Accelerator, InitProcessGroupKwargs

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s))]
    )
    if accelerator.num_processes != world:
        raise DvtrainError(
            f"the launcher started {world} processes but they did not form one process group "
            f"(this rank sees {accelerator.num_processes}); on CPU use `accelerate launch --multi_gpu "
            "--num_processes N --main_process_port 0` or `torchrun --nproc_per_node N`"
        )
    device = accelerator.device if not cpu else torch.device("cpu")
    if whole_ensemble:
        return LocalPlacement(cfg.ensemble.size), device
    return ProcessGroupPlacement(cfg.ensemble.size, accelerator.process_index, world, device), device


def shutdown() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
