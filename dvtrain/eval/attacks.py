"""White-box attacks that maximise the cross-entropy of a model on images in [0, 1].

Used both to score models (`dvtrain.eval.whitebox`) and inside training (DVERGE+AdvT), so each is batched
with no per-sample Python loop. The model is called as `model(x)` and may return logits or
log-probabilities (e.g. a `Mixture`). Gradients are taken with respect to the input only, so no
parameter `.grad` is touched, and the model's train/eval mode is left as the caller set it. Every ε is
in pixel units; results are detached and clamped to [0, 1]. Random starts draw from `generator` on its
own device (dvtrain keeps generators on the CPU so a seed means the same numbers everywhere) and are
then moved to x's device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _input_grad(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the mean cross-entropy with respect to x alone (works under a caller's no_grad)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


def _noise(
    sample: Callable[..., Tensor], shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Noise on `like`'s device and dtype, reproducible from `generator` wherever that lives."""
    device = generator.device if generator is not None else like.device
    return sample(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Broadcast one value per sample [N] over the image dimensions of `like`."""
    return values.view(-1, *[1] * (like.ndim - 1))


def _l2_norms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Nearest image in [0, 1] within L∞ distance eps of x."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def project_l2(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Scale each perturbation back onto the L2 ball of radius eps, then clamp to [0, 1].

    Clamping after the projection keeps the budget: it only moves pixels towards x's values.
    """
    delta = x_adv - x
    tiny = torch.finfo(delta.dtype).tiny
    scale = (eps / _l2_norms(delta).clamp_min(tiny)).clamp(max=1.0)
    return (x + delta * _per_sample(scale, delta)).clamp(0.0, 1.0)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step of size eps (Goodfellow et al., 2015)."""
    return (x + eps * _input_grad(model, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD in the L∞ ball (Madry et al., 2018): signed steps, each followed by projection."""
    x = x.detach()
    start = linf_random_start(x, eps, generator) if random_start else x.clone()
    return pgd_linf_from(model, x, y, start, eps, step_size, steps)


def linf_random_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """A uniformly random point of the L∞ ε-ball around x, clamped to [0, 1]."""
    return (x + (2 * _noise(torch.rand, x.shape, x, generator) - 1) * eps).clamp(0.0, 1.0)


def pgd_linf_from(
    model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, start: Tensor, eps: float, step_size: float, steps: int
) -> Tensor:
    """The steps of `pgd_linf` from a given start inside the ε-ball of x."""
    x_adv = start
    for _ in range(steps):
        x_adv = project_linf(x_adv + step_size * _input_grad(model, x_adv, y).sign(), x, eps)
    return x_adv.detach()


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD in the L2 ball: steps along each sample's unit-L2 gradient, each followed by projection.

    The random start is a uniformly random direction at a uniformly random radius in [0, eps].
    """
    x = x.detach()
    x_adv = x.clone()
    tiny = torch.finfo(x.dtype).tiny
    if random_start:
        direction = _noise(torch.randn, x.shape, x, generator)
        direction = direction / _per_sample(_l2_norms(direction).clamp_min(tiny), x)
        radius = _noise(torch.rand, (len(x),), x, generator) * eps
        x_adv = (x + direction * _per_sample(radius, x)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y)
        unit = grad / _per_sample(_l2_norms(grad).clamp_min(tiny), grad)
        x_adv = project_l2(x_adv + step_size * unit, x, eps)
    return x_adv.detach()
