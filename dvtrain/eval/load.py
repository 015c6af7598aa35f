"""Loading a trained run for evaluation: every submodel of a finished stage in one process.

Also behind the public API `dvtrain.load_submodels` / `dvtrain.load_mixture`, so users can run their
own attack libraries on a run: the mixture takes images in [0, 1] and returns its log mean
probabilities [N, K], which any library can treat as logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dvtrain import checkpoint, rundir
from dvtrain.compute import set_threads
from dvtrain.config import Config, load_config
from dvtrain.data import Dataset, load_dataset
from dvtrain.errors import DvtrainError
from dvtrain.mixture import Mixture
from dvtrain.rundir import RunDir
from dvtrain.submodels import Owned, build_submodel

CONFIG_FILE = rundir.CONFIG
THREADS_ENV = "OMP_NUM_THREADS"  # a user who sets it has chosen the thread count: the API leaves it alone


def load_submodel_weights(cfg: Config, data: Dataset, path: Path, device: torch.device) -> list[nn.Module]:
    """cfg.ensemble.size submodels with the weights of the checkpoint at `path`, in eval mode, on `device`."""
    models = {i: build_submodel(cfg, data, i).to(device) for i in range(cfg.ensemble.size)}
    checkpoint.load_weights(path, Owned(models=models, optimizers={}, generators={}, data_generators={}))
    return [models[i].eval() for i in sorted(models)]


def stage_finished(run_dir: Path, stage: str) -> bool:
    path = checkpoint.latest(RunDir(run_dir).checkpoints(stage))
    return path is not None and bool(checkpoint.read_state(path).get("complete"))


def finished_stages(run_dir: Path, cfg: Config, stages: list[str] | None) -> list[str]:
    """The requested stages (all with a finished checkpoint when None); a requested unfinished one is an error."""
    if stages is None:
        return [s for s in cfg.stages if stage_finished(run_dir, s)]
    for stage in stages:
        if not stage_finished(run_dir, stage):
            raise DvtrainError(f"stage {stage} has no finished checkpoint in {run_dir}; train it first")
    return list(stages)


def load_stage(run_dir: Path, cfg: Config, data: Dataset, stage: str, device: torch.device) -> list[nn.Module]:
    """Every submodel of a finished stage in one process, in eval mode."""
    return load_submodel_weights(cfg, data, checkpoint.latest(RunDir(run_dir).checkpoints(stage)), device)


def thread_policy(cfg: Config) -> int:
    """The CLI's torch thread count for the API: the run's `compute.threads` (default 1; see
    `dvtrain.compute.set_threads`), unless OMP_NUM_THREADS is set, which then stands. Returns the count.

    Why: torch's default of one thread per core makes attacks on a busy machine many times slower (the
    README's AutoAttack example: not done after 600 s at the default, 135 s at one thread on 2 shared
    cores). To choose another count in Python, call `torch.set_num_threads(k)` after loading."""
    if os.environ.get(THREADS_ENV):
        return torch.get_num_threads()
    return set_threads(cfg.compute)


def load_submodels(run_dir: str | Path, stage: str, device: str | torch.device | None = None) -> list[nn.Module]:
    """The submodels of a finished stage of a dvtrain run, in eval mode, on `device` (default: CPU).

    Each maps images [N, C, H, W] in [0, 1] to logits [N, K]. Sets torch's CPU threads as the CLI
    does (`thread_policy`: the run's compute.threads unless OMP_NUM_THREADS is set). Raises
    DvtrainError if RUN_DIR is not a run directory or the stage has no finished checkpoint there.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise DvtrainError(f"{run_dir} is not a dvtrain run directory (no {CONFIG_FILE}); pass the directory train wrote")
    cfg = load_config(run_dir / CONFIG_FILE)
    finished_stages(run_dir, cfg, [stage])
    thread_policy(cfg)
    device = torch.device("cpu" if device is None else device)
    return load_stage(run_dir, cfg, load_dataset(cfg.data), stage, device)


def load_mixture(run_dir: str | Path, stage: str, device: str | torch.device | None = None) -> nn.Module:
    """The ensemble of a finished stage as one model (`dvtrain.mixture.Mixture`), in eval mode.

    Input images [N, C, H, W] in [0, 1]; output log (1/M) Σ_i softmax(f_i(x)) [N, K], usable as logits
    by any attack library (e.g. AutoAttack). Threads and errors as `load_submodels`.
    """
    return Mixture(load_submodels(run_dir, stage, device)).eval()
