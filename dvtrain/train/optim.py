"""The owned submodels' optimizers and their learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from dvtrain.compute import prepare_model
from dvtrain.config import Config, OptimConfig
from dvtrain.data import Dataset
from dvtrain.rng import stream
from dvtrain.submodels import Owned, build_submodel


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """One optimizer per submodel: Adam and SGD act parameter by parameter, so this equals the reference
    trainers' single optimizer over the whole ensemble. `foreach`: a few multi-tensor operations per
    step instead of a few per parameter (torch's default on GPUs, and the same arithmetic)."""
    if cfg.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, foreach=True)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
    )


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epoch: int) -> float:
    """Step schedule: lr × gamma for every milestone reached. Derived from the epoch, so resuming needs no state."""
    lr = cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def build_owned(cfg: Config, data: Dataset, ids: list[int], stage: str, device: torch.device) -> Owned:
    """Fresh submodels, optimizers for `stage` and per-submodel streams keyed by (seed, stage, index)."""
    optim_cfg = cfg.section(stage).optim
    models = {i: prepare_model(build_submodel(cfg, data, i).to(device), cfg.compute, len(ids)) for i in ids}
    return Owned(
        models=models,
        optimizers={i: build_optimizer(models[i], optim_cfg) for i in ids},
        generators={i: stream(cfg.seed, "noise", stage, i) for i in ids},
        data_generators={i: stream(cfg.seed, "data", stage, i) for i in ids},
    )
