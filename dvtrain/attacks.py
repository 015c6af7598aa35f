"""White-box attacks (FGSM, PGD-L∞, PGD-L2) that maximise a loss of a model on images in [0, 1].

The loss is selectable per attack (`LOSSES`): cross-entropy ("ce"), the CW margin ("cw", Carlini &
Wagner, S&P 2017, objective f6 without its confidence clamp: max_{j≠y} z_j − z_y) or the
difference-of-logits ratio ("dlr", Croce & Hein, ICML 2020, eq. 5). Cross-entropy is blind to
saturated logits: when a model's softmax is one-hot in float32, its gradient underflows to zero and
sign-PGD stands still, while the margin losses' gradients are as large as the logits'. DLR is also
invariant to the scale of the logits.

Used both to score models (`dvtrain.eval`) and inside training (distillation, DVERGE+AdvT), so it lives
in the core; each attack is batched with no per-sample Python loop. The model is called as `model(x)`
and may return logits or log-probabilities (e.g. a `Mixture`). Gradients are taken with respect to the
input only, so no parameter `.grad` is touched, and the model's train/eval mode is left as the caller
set it. Every ε is in pixel units; results are detached and clamped to [0, 1]. Random starts draw from
`generator` on its own device (dvtrain keeps generators on the CPU so a seed means the same numbers
everywhere) and are then moved to x's device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


LOSSES = ("ce", "cw", "dlr")
DLR_DENOMINATOR_FLOOR = 1e-12  # Croce & Hein 2020: keeps DLR finite when the top logits tie


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin per image [N] of logits [N, K]: the best other class's logit minus the true class's.
    Positive exactly where the image is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.max(dim=1).values - true


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Difference-of-logits ratio per image [N]: margin / (z_π1 − z_π3), z sorted in decreasing order
    (Croce & Hein, ICML 2020, eq. 5, sign flipped so that larger is better for the attacker)."""
    top = logits.sort(dim=1, descending=True).values
    return margin(logits, y) / (top[:, 0] - top[:, 2] + DLR_DENOMINATOR_FLOOR)


def attack_loss(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    """Mean over the batch of the named loss (one of `LOSSES`); raises ValueError for another name."""
    if loss == "ce":
        return F.cross_entropy(logits, y)
    if loss == "cw":
        return margin(logits, y).mean()
    if loss == "dlr":
        return dlr(logits, y).mean()
    raise ValueError(f"unknown attack loss {loss!r}; choose from {', '.join(LOSSES)}")


def input_grad(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Gradient of the mean `loss` with respect to x alone (works under a caller's no_grad)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(attack_loss(model(x), y, loss), x)
    return grad


def noise(
    sample: Callable[..., Tensor], shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Noise on `like`'s device and dtype, reproducible from `generator` wherever that lives."""
    device = generator.device if generator is not None else like.device
    return sample(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Broadcast one value per sample [N] over the image dimensions of `like`."""
    return values.view(-1, *[1] * (like.ndim - 1))


def l2_norms(t: Tensor) -> Tensor:
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
    scale = (eps / l2_norms(delta).clamp_min(tiny)).clamp(max=1.0)
    return (x + delta * per_sample(scale, delta)).clamp(0.0, 1.0)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, loss: str = "ce") -> Tensor:
    """One signed-gradient step of size eps (Goodfellow et al., 2015)."""
    return (x + eps * input_grad(model, x, y, loss).sign()).clamp(0.0, 1.0).detach()


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool,
    generator: torch.Generator | None = None,
    loss: str = "ce",
) -> Tensor:
    """PGD in the L∞ ball (Madry et al., 2018): signed steps of `loss`'s gradient, each followed by projection."""
    x = x.detach()
    start = linf_random_start(x, eps, generator) if random_start else x.clone()
    return pgd_linf_from(model, x, y, start, eps, step_size, steps, loss)


def linf_random_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """A uniformly random point of the L∞ ε-ball around x, clamped to [0, 1]."""
    return (x + (2 * noise(torch.rand, x.shape, x, generator) - 1) * eps).clamp(0.0, 1.0)


def pgd_linf_from(
    model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, start: Tensor, eps: float, step_size: float, steps: int,
    loss: str = "ce",
) -> Tensor:
    """The steps of `pgd_linf` from a given start inside the ε-ball of x."""
    x_adv = start
    for _ in range(steps):
        x_adv = project_linf(x_adv + step_size * input_grad(model, x_adv, y, loss).sign(), x, eps)
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
    loss: str = "ce",
) -> Tensor:
    """PGD in the L2 ball: steps along each sample's unit-L2 gradient, each followed by projection.

    The random start is a uniformly random direction at a uniformly random radius in [0, eps].
    """
    x = x.detach()
    x_adv = x.clone()
    tiny = torch.finfo(x.dtype).tiny
    if random_start:
        direction = noise(torch.randn, x.shape, x, generator)
        direction = direction / per_sample(l2_norms(direction).clamp_min(tiny), x)
        radius = noise(torch.rand, (len(x),), x, generator) * eps
        x_adv = (x + direction * per_sample(radius, x)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = input_grad(model, x_adv, y, loss)
        unit = grad / per_sample(l2_norms(grad).clamp_min(tiny), grad)
        x_adv = project_l2(x_adv + step_size * unit, x, eps)
    return x_adv.detach()
