"""The checks made before a stage starts, shared by the command line (which makes them for every stage
before any work, on every rank alike) and the stage loop (which makes them again when a stage starts:
a run directory may change between the two, e.g. a concurrent `--overwrite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dvtrain import checkpoint
from dvtrain.config import Config
from dvtrain.errors import DvtrainError
from dvtrain.rundir import RunDir


def checkpoint_state(cfg: Config, path: Path) -> dict:
    """The state of the checkpoint at `path`, which must hold this configuration's architecture and ensemble size.

    Raises:
        checkpoint.CheckpointError: it holds another architecture or ensemble size (or cannot be read).
    """
    state = checkpoint.read_state(path)
    expected = {"arch": cfg.model.arch, "ensemble_size": cfg.ensemble.size}
    found = {k: state.get(k) for k in expected}
    if found != expected:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} holds {found}, but the config asks for {expected}; use another run directory"
        )
    return state


def finished(run_dir: Path | None, stage: str) -> bool:
    """Whether `stage` has a whole, complete checkpoint in the run (None: a new run, nothing is finished)."""
    path = None if run_dir is None else checkpoint.latest(RunDir(run_dir).checkpoints(stage))
    return path is not None and bool(checkpoint.read_state(path).get("complete"))


def check_start(cfg: Config, run_dir: Path | None, stage: str, trained_before: Sequence[str] = ()) -> Path | None:
    """What would stop `stage` at its start: its own checkpoint (returned, None if it has none) must be of
    this configuration; without one, the stage it starts from (`init_from`) must be finished in the run or
    trained before it (`trained_before`, by this command).

    Raises:
        checkpoint.CheckpointError: the stage's checkpoint is of another architecture or ensemble size.
        DvtrainError: the stage's starting weights will not exist.
    """
    path = None if run_dir is None else checkpoint.latest(RunDir(run_dir).checkpoints(stage))
    if path is not None:
        checkpoint_state(cfg, path)
        return path
    source = cfg.section(stage).init_from
    if source is not None and source not in trained_before and not finished(run_dir, source):
        raise DvtrainError(
            f"stage {stage} starts from the final weights of stage {source}, which this run has not finished; "
            f"add {source} to stages before {stage} or resume a run directory that has it"
        )
    return None
