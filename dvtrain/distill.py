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
from torch import Tensor, nn

from dvtrain.attacks import linf_random_start
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
    lower = (anchor - cfg.eps).clamp_min(0.0)
    upper = (anchor + cfg.eps).clamp_max(1.0)
    z = start.detach()
    velocity = torch.zeros_like(z)
    tiny = torch.finfo(z.dtype).tiny
    # d/df of Σ‖f − target‖² / per_model, as mse_loss's backward computes it: 2·(f − target)·(1/per_model),
    # in at least float32 (under bf16 autocast mse_loss runs in float32 too).
    precision = torch.promote_types(target.dtype, torch.float32)
    two_over_n = 2 * (torch.ones((), dtype=precision, device=z.device) / (target.numel() // groups))
    channels = z.shape[1] // groups
    same_model = torch.block_diag(*[torch.ones(channels, channels, dtype=z.dtype, device=z.device)] * groups) \
        if groups > 1 else None
    for _ in range(cfg.steps):
        z.requires_grad_(True)
        f = features(z)
        residual = (f.to(precision) - target.to(precision)).mul_(two_over_n)
        (grad,) = torch.autograd.grad(f, z, residual.to(f.dtype))
        with torch.no_grad():
            if cfg.momentum > 0:
                velocity.mul_(cfg.momentum).addcdiv_(grad, _image_l1(grad, same_model).clamp_min(tiny))
            else:
                velocity = grad
            z = z.sub(velocity.sign(), alpha=cfg.step_size).clamp_(lower, upper)
    return z


def _image_l1(grad: Tensor, same_model: Tensor | None) -> Tensor:
    """L1 norm of each image's gradient per model, broadcastable against grad [B, groups·C, H, W].

    One model (`same_model` None): summed over the flattened image, the reference's order, so the
    loop engine's results stay bit for bit. Several (channels-last, folded): each channel plane's L1
    norm, then summed over each model's channels and spread back to them in one product with
    `same_model`, the [groups·C, groups·C] block-diagonal matrix of ones; two operators, and no
    strided reduction (15× slower on the CPU). The order differs only by rounding.
    """
    if same_model is None:
        return grad.abs().flatten(1).sum(dim=1).view(-1, 1, 1, 1)
    planes = torch.linalg.vector_norm(grad, ord=1, dim=(2, 3))  # [B, groups·C]
    return (planes @ same_model).view(*planes.shape, 1, 1)


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
