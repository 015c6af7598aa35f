"""Feature distillation: the input that a submodel's layer l cannot tell from x, hidden near x_s.

    x'_{f^l}(x, x_s) = argmin_z ||f^l(z) - f^l(x)||²   s.t.  ||z - x_s||∞ ≤ ε,  z ∈ [0, 1]

solved by PGD in input space starting at x_s. As in the reference code, each step's gradient is
normalised per image by its L1 norm and accumulated with `momentum` (MI-FGSM style) before the sign
step; momentum 0 gives plain sign-gradient descent. Unlike the reference, the target features f^l(x)
are computed once rather than at every step, and the gradient is taken with respect to z only, so no
weight gradients are computed and thrown away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.eval.attacks import linf_random_start, project_linf
from dvtrain.config import DvergeConfig
from dvtrain.models import training_mode


def feature_pgd(
    features: Callable[[Tensor], Tensor], target: Tensor, x_s: Tensor, cfg: DvergeConfig,
    generators: Sequence[torch.Generator],
) -> Tensor:
    """The PGD of distillation for n models at once: z stacks their n copies of x_s, [n·B, C, H, W].

    `features(z)` returns all n models' features, `target` those of x. The loss sums each model's
    mean squared error, so each model's share of the gradient is exactly its own; `generators` (one per
    model) feed the optional random start.
    """
    n = len(generators)
    anchor = x_s.repeat(n, *[1] * (x_s.ndim - 1))
    if cfg.random_start:
        z = torch.cat([linf_random_start(x_s, cfg.eps, g) for g in generators])
    else:
        z = anchor.clone()
    per_model = target.numel() // n
    velocity = torch.zeros_like(z)
    tiny = torch.finfo(z.dtype).tiny
    for _ in range(cfg.steps):
        z.requires_grad_(True)
        loss = F.mse_loss(features(z), target, reduction="sum") / per_model
        (grad,) = torch.autograd.grad(loss, z)
        if cfg.momentum > 0:
            l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(tiny).view(-1, *[1] * (grad.ndim - 1))
            velocity = cfg.momentum * velocity + grad / l1
        else:
            velocity = grad
        z = project_linf(z.detach() - cfg.step_size * velocity.sign(), anchor, cfg.eps)
    return z.detach()


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
        return feature_pgd(lambda z: model.features(z, layer), target, x_s, cfg, [generator])
