"""Feature distillation: the input that a submodel's layer l cannot tell from x, hidden near x_s.

    x'_{f^l}(x, x_s) = argmin_z ||f^l(z) - f^l(x)||²   s.t.  ||z - x_s||∞ ≤ ε,  z ∈ [0, 1]

solved by PGD in input space starting at x_s. As in the reference code, each step's gradient is
normalised per image by its L1 norm and accumulated with `momentum` (MI-FGSM style) before the sign
step; momentum 0 gives plain sign-gradient descent. Unlike the reference, the target features f^l(x)
are computed once rather than at every step, and the gradient is taken with respect to z only, so no
weight gradients are computed and thrown away.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.eval.attacks import linf_random_start
from dvtrain.config import DvergeConfig
from dvtrain.models import training_mode


def feature_pgd(
    features: Callable[[Tensor], Tensor], target: Tensor, start: Tensor, anchor: Tensor, cfg: DvergeConfig,
    groups: int = 1,
) -> Tensor:
    """The PGD of distillation, for `groups` models at once, from `start` within ε of `anchor`.

    z, `start` and `anchor` are [B, groups·C, H, W]: model k's images in channel group k (one model:
    [B, C, H, W]), in whatever memory format `features` prefers. `features(z)` returns all models'
    features, `target` those of x, in the same layout. The loss sums each model's mean squared error,
    so each model's share of the gradient is exactly its own, and the L1 norm is taken per image and
    model. Each step is a handful of whole-batch operations: the L∞ ball and [0, 1] are one interval
    per pixel, [max(anchor − ε, 0), min(anchor + ε, 1)], computed once (the same projection as
    `project_linf`, bit for bit, since the anchor lies in [0, 1]).
    """
    per_model = target.numel() // groups
    lower = (anchor - cfg.eps).clamp_min(0.0)
    upper = (anchor + cfg.eps).clamp_max(1.0)
    z = start.detach()
    velocity = torch.zeros_like(z)
    tiny = torch.finfo(z.dtype).tiny
    for _ in range(cfg.steps):
        z.requires_grad_(True)
        loss = F.mse_loss(features(z), target, reduction="sum") / per_model
        (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            if cfg.momentum > 0:
                per_image = grad.unflatten(1, (groups, -1))  # [B, groups, C, H, W], a view
                l1 = per_image.abs().sum(dim=(2, 3, 4), keepdim=True).clamp_min(tiny)
                velocity.unflatten(1, (groups, -1)).mul_(cfg.momentum).addcdiv_(per_image, l1)
            else:
                velocity = grad
            z = z.sub(velocity.sign(), alpha=cfg.step_size).clamp_(lower, upper)
    return z


def distill(
    model: nn.Module, layer: int, x: Tensor, x_s: Tensor, cfg: DvergeConfig, generator: torch.Generator
) -> Tensor:
    """Distilled batch x' of `model` at `layer`: looks like x_s, has the layer-l features of x.

    `cfg.bn_mode` decides whether BatchNorm layers use batch statistics ("train", as the reference
    code does; their running statistics are then updated by these forwards) or running ones ("eval").
    `generator` feeds the optional random start.
    """
    with training_mode(model, cfg.bn_mode == "train"):
        with torch.no_grad():
            target = model.features(x, layer)
        start = linf_random_start(x_s, cfg.eps, generator) if cfg.random_start else x_s
        return feature_pgd(lambda z: model.features(z, layer), target, start, x_s, cfg)
