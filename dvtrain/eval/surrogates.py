"""Surrogate ensembles of the black-box protocol: plain ensembles of the run's architecture, one per size
of `eval.transfer.surrogate_sizes` (the paper: 3, 5 and 8), each an ordinary vanilla-stage run directory

    <cache>/surrogates/<data>-<hash>/ens<k>-<arch>-<hash>/   config.yaml, checkpoints/vanilla/, results.json

trained by dvtrain's own stage loop, so it checkpoints and resumes like any run (Ctrl-C during `dvtrain
eval` keeps a checkpoint and the next `dvtrain eval` continues it), and a large one can be trained ahead
over several ranks with `dvtrain train --run-dir <that folder> --resume` under torchrun. Training is
training code: the trainer is handed in by the composition root (`dvtrain.cli`), so evaluation imports
none of it. Each size gets its own seed derived from `eval.transfer.seed`, so no member is shared
between the ensembles, nor with any evaluated run; the folders are shared by every run on the same data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from dvtrain import storage
from dvtrain.config import Config, TransferConfig, dump_yaml, to_dict
from dvtrain.data import Dataset
from dvtrain.eval.example_sets import identity_hash
from dvtrain.eval.load import CONFIG_FILE, load_stage, stage_finished
from dvtrain.rng import derive_seed

CACHE_DIR = "transfer_cache"  # beside the run directory unless eval.transfer.cache_dir names one
SURROGATES = "surrogates"
STAGE = "vanilla"
# Data settings that do not change the images (where they are read from, how they are checked).
NOT_DATA_IDENTITY = ("root", "download", "verify_checksums")

# trainer(run_dir, cfg, data, device): trains (or resumes) cfg's stages in run_dir, in this process.
SurrogateTrainer = Callable[[Path, Config, Dataset, torch.device], object]


def cache_root(run_dir: Path, tcfg: TransferConfig) -> Path:
    """The shared cache: eval.transfer.cache_dir, else `transfer_cache` in the folder holding the run."""
    return Path(tcfg.cache_dir) if tcfg.cache_dir else Path(run_dir).resolve().parent / CACHE_DIR


def data_identity(cfg: Config) -> dict:
    """What the images depend on: the data section without where it is read from."""
    return {k: v for k, v in to_dict(cfg)["data"].items() if k not in NOT_DATA_IDENTITY}


def data_folder(cfg: Config) -> str:
    return f"{cfg.data.name}-{identity_hash(data_identity(cfg))}"


def surrogate_config(cfg: Config, tcfg: TransferConfig, size: int) -> Config:
    """The run's architecture and vanilla recipe for `size` plain submodels, with a seed of their own
    (derived from eval.transfer.seed and the size); no W&B run, and only clean accuracy after training."""
    epochs = cfg.vanilla.epochs if tcfg.surrogate_epochs is None else tcfg.surrogate_epochs
    return dataclasses.replace(
        cfg,
        name=f"surrogate-ens{size}",
        seed=derive_seed(tcfg.seed, SURROGATES, size),
        stages=[STAGE],
        ensemble=dataclasses.replace(cfg.ensemble, size=size),
        vanilla=dataclasses.replace(cfg.vanilla, epochs=epochs, init_from=None),
        eval=dataclasses.replace(cfg.eval, attacks=["clean"]),
        logging=dataclasses.replace(cfg.logging, wandb="disabled", artifacts=False),
    )


def surrogate_identity(scfg: Config) -> dict:
    """What a surrogate ensemble's weights depend on; a different identity is a different folder."""
    tree = to_dict(scfg)
    return {"seed": scfg.seed, "data": data_identity(scfg), "precision": scfg.compute.precision,
            **{k: tree[k] for k in ("model", "ensemble", "vanilla")}}


def surrogate_dir(root: Path, scfg: Config) -> Path:
    name = f"ens{scfg.ensemble.size}-{scfg.model.arch}-{identity_hash(surrogate_identity(scfg))}"
    return Path(root) / SURROGATES / data_folder(scfg) / name


def is_trained(root: Path, scfg: Config) -> bool:
    """Whether the surrogate ensemble of `scfg` is finished in the cache under `root` (it would only load)."""
    return stage_finished(surrogate_dir(root, scfg), STAGE)


def load_or_train(root: Path, scfg: Config, data: Dataset, device: torch.device, train: SurrogateTrainer) -> list[nn.Module]:
    """The surrogate ensemble of `scfg` in eval mode: trained (or resumed) by `train` in its folder under
    `root` unless finished there already. A file lock keeps two evaluations from training it at once."""
    folder = surrogate_dir(root, scfg)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if not stage_finished(folder, STAGE):
            if not (folder / CONFIG_FILE).is_file():
                storage.write_atomic(folder / CONFIG_FILE, dump_yaml(scfg))
            print(f"[eval] training the surrogate ensemble ({scfg.ensemble.size} × {scfg.model.arch}, "
                  f"{scfg.vanilla.epochs} epochs) in {folder}", flush=True)
            train(folder, scfg, data, device)
    return load_stage(folder, scfg, data, STAGE, device)
