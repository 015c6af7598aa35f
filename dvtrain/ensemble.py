"""The submodels a process owns, with their optimizers and random streams."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dvtrain.compute import prepare_model
from dvtrain.config import Config, OptimConfig
from dvtrain.data import Dataset
from dvtrain.models import build_model
from dvtrain.rng import derive_seed, stream


@dataclass
class Owned:
    """Submodel index → model / optimizer / generator, for the submodels of one process."""

    models: dict[int, nn.Module]
    optimizers: dict[int, torch.optim.Optimizer]
    # Random starts (distillation, adversarial examples): consumed step by step.
    generators: dict[int, torch.Generator]
    # Data order and augmentation of the `vanilla` stage: replayed from the epoch start on resume.
    data_generators: dict[int, torch.Generator]

    @property
    def ids(self) -> list[int]:
        return sorted(self.models)


def build_submodel(cfg: Config, data: Dataset, index: int) -> nn.Module:
    """Submodel `index`, initialised from its own seed whatever process builds it (built on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", index))
        return build_model(
            cfg.model.arch,
            in_channels=data.channels,
            image_size=data.image_size,
            num_classes=data.num_classes,
            mean=data.mean,
            std=data.std,
            conv_padding=cfg.model.conv_padding,
        )


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """One optimizer per submodel: Adam and SGD act parameter by parameter, so this equals the reference
    trainers' single optimizer over the whole ensemble."""
    if cfg.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epoch: int) -> float:
    """Step schedule: lr × gamma for every milestone reached. Derived from the epoch, so resuming needs no state."""
    lr = cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def build_owned(cfg: Config, data: Dataset, ids: list[int], stage: str, device: torch.device) -> Owned:
    """Fresh submodels, optimizers for `stage` and per-submodel streams keyed by (seed, stage, index)."""
    optim_cfg = cfg.stage_config(stage).optim
    models = {i: prepare_model(build_submodel(cfg, data, i).to(device), cfg.compute, len(ids)) for i in ids}
    return Owned(
        models=models,
        optimizers={i: build_optimizer(models[i], optim_cfg) for i in ids},
        generators={i: stream(cfg.seed, "noise", stage, i) for i in ids},
        data_generators={i: stream(cfg.seed, "data", stage, i) for i in ids},
    )
