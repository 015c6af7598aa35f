"""The submodels of an ensemble: building submodel i from its own seed, and the set a process owns.

Shared by training (which steps the owned submodels' optimizers), checkpoints (which save and restore
them) and evaluation (which loads them), so it lives beside the models, not inside `dvtrain.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dvtrain.config import Config
from dvtrain.data import Dataset
from dvtrain.models import build_model
from dvtrain.rng import derive_seed


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
