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
from torch import nn

from dvtrain import storage
from dvtrain.config import Config, TransferConfig, dump_yaml, to_dict
from dvtrain.data import Dataset
from dvtrain.digest import split_digest
from dvtrain.eval.example_sets import holding, identity_hash
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


def data_digest(data: Dataset) -> dict[str, str]:
    """What the surrogates' weights and the example sets rest on: the digest of the train and test images
    and labels themselves (`dvtrain.digest.split_digest`), so two data.root folders holding other images
    never share a cache entry (issue 26, finding 2), and one holding the same images does."""
    return split_digest(data.x_train, data.y_train, data.x_test, data.y_test)


def data_identity(cfg: Config, digest: dict[str, str]) -> dict:
    """The data section without where it is read from, and the content `digest` (`data_digest`)."""
    return {k: v for k, v in to_dict(cfg)["data"].items() if k not in NOT_DATA_IDENTITY} | {"content": digest}


def data_folder(cfg: Config, digest: dict[str, str]) -> str:
    return f"{cfg.data.name}-{identity_hash(data_identity(cfg, digest))}"


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


def surrogate_identity(scfg: Config, digest: dict[str, str]) -> dict:
    """What a surrogate ensemble's weights depend on (the data by content, `data_digest`); a different
    identity is a different folder."""
    tree = to_dict(scfg)
    return {"seed": scfg.seed, "data": data_identity(scfg, digest), "precision": scfg.compute.precision,
            **{k: tree[k] for k in ("model", "ensemble", "vanilla")}}


def surrogate_dir(root: Path, scfg: Config, digest: dict[str, str]) -> Path:
    name = f"ens{scfg.ensemble.size}-{scfg.model.arch}-{identity_hash(surrogate_identity(scfg, digest))}"
    return Path(root) / SURROGATES / data_folder(scfg, digest) / name


def is_trained(root: Path, scfg: Config, digest: dict[str, str]) -> bool:
    """Whether the surrogate ensemble of `scfg` is finished in the cache under `root` (it would only load)."""
    return stage_finished(surrogate_dir(root, scfg, digest), STAGE)


def load_or_train(root: Path, scfg: Config, data: Dataset, device: torch.device, train: SurrogateTrainer,
                  digest: dict[str, str] | None = None) -> list[nn.Module]:
    """The surrogate ensemble of `scfg` in eval mode: trained (or resumed) by `train` in its folder under
    `root` unless finished there already. `digest`: `data_digest(data)` (computed when None). A file lock
    keeps two evaluations from training it at once; a wait longer than a few seconds says so; a finished
    ensemble is loaded without it. Raises PathError when the lock is another user's and not writable."""
    folder = surrogate_dir(root, scfg, data_digest(data) if digest is None else digest)
    if stage_finished(folder, STAGE):  # finished: read without the lock (a cache shared read-only can be read)
        return load_stage(folder, scfg, data, STAGE, device)
    folder.mkdir(parents=True, exist_ok=True)
    with holding(folder.with_name(folder.name + ".lock"), f"surrogate ensemble {folder.name} being trained"):
        if not stage_finished(folder, STAGE):
            if not (folder / CONFIG_FILE).is_file():
                storage.write_atomic(folder / CONFIG_FILE, dump_yaml(scfg))
            print(f"[eval] training the surrogate ensemble ({scfg.ensemble.size} × {scfg.model.arch}, "
                  f"{scfg.vanilla.epochs} epochs) in {folder}", flush=True)
            train(folder, scfg, data, device)
    return load_stage(folder, scfg, data, STAGE, device)
