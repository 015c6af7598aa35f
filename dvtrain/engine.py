"""Engines: how the owned submodels' share of a DVERGE step is computed.

A DVERGE step asks an engine for two things: the distilled batches of the owned submodels, and the
gradients of their diversity losses. `LoopEngine` does it one model at a time — the reference path,
simple and obviously right, which faster engines are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain.config import DvergeConfig
from dvtrain.distill import distill
from dvtrain.models import LayeredNet


class LoopEngine:
    """One submodel at a time, one forward per distilled batch."""

    def distill(
        self, models: list[LayeredNet], layer: int, x: Tensor, x_s: Tensor, cfg: DvergeConfig,
        generators: list[torch.Generator],
    ) -> Tensor:
        """[len(models), B, C, H, W]: each model's distilled batch, from its current weights."""
        return torch.stack([distill(m, layer, x, x_s, cfg, g) for m, g in zip(models, generators)])

    def diversity_backward(
        self, models: list[LayeredNet], ids: list[int], distilled: Tensor, y_s: Tensor, weight: float
    ) -> Tensor:
        """For each model (submodel `ids[k]`): loss = Σ_{j≠ids[k]} CE(model(distilled[j]), y_s).

        Accumulates `weight ×` its gradient into the model's `.grad` (as `backward` would) and returns
        the unweighted losses, detached, as a [len(models)] tensor. Models must be in train mode.
        """
        losses = []
        for model, i in zip(models, ids):
            loss = sum(F.cross_entropy(model(distilled[j]), y_s) for j in range(len(distilled)) if j != i)
            (weight * loss).backward()
            losses.append(loss.detach())
        return torch.stack(losses)


ENGINES = {"loop": LoopEngine}


def make_engine(name: str):
    return ENGINES[name]()
