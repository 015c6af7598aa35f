"""APGD-CE: the parameter-free PGD of AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", Algorithm 1), L∞ only.

Plain PGD needs a step size and keeps whatever its last iterate is. APGD starts with a large step
(2ε), adds momentum, remembers each image's highest-loss point, and halves an image's step at fixed
checkpoints when its loss stopped climbing, restarting that image from its best point. It is
dvtrain's own implementation of the paper, batched: every image has its own step size and
checkpoint decisions, with no per-sample Python loop.

The model is called as `model(x)` and may return logits or log-probabilities (a `Mixture`); its mode
is left as the caller set it and no parameter `.grad` is touched. Images are in [0, 1], ε in pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.eval.attacks import _noise, _per_sample, project_linf

# Croce & Hein 2020, §3.2: checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06).
FIRST_CHECKPOINT = 0.22
CHECKPOINT_SHRINK = 0.03
MIN_CHECKPOINT_STRIDE = 0.06
INITIAL_STEP_FACTOR = 2.0  # η(0) = 2ε
MOMENTUM = 0.75  # α: weight of the new gradient step against the previous move
SUCCESS_RATE = 0.75  # ρ: a window where fewer than ρ of the steps raised the loss halves the step
STEP_DECAY = 0.5
FRACTION_DIGITS = 9  # the p_j are sums of two-digit decimals: round away float error before ⌈·⌉


def checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ⌈p_j · steps⌉ (0 < w_j < steps) at which the step size may be halved."""
    p = [0.0, FIRST_CHECKPOINT]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - CHECKPOINT_SHRINK, MIN_CHECKPOINT_STRIDE))
    marks = {math.ceil(round(q * steps, FRACTION_DIGITS)) for q in p[1:]}  # 0.57 · 100 is 57, not 57.000…01
    return sorted(w for w in marks if 0 < w < steps)


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image cross-entropy, its input gradient, and whether the image is misclassified."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = model(x)
        loss = F.cross_entropy(out, y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad, out.argmax(dim=1) != y


def _rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a where the per-image mask is true, else b."""
    return torch.where(_per_sample(mask, a), a, b)


def _should_halve(raised: Tensor, window: int, halved_before: Tensor, best_loss: Tensor, best_before: Tensor) -> Tensor:
    """The paper's two conditions at a checkpoint: too few steps raised the loss in the window, or
    the step was not halved at the previous checkpoint and the best loss has not improved since."""
    return (raised < SUCCESS_RATE * window) | (~halved_before & (best_loss <= best_before))


def _apgd_run(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, start: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD run from `start`. Per image: a fooling point if one was met, else the best-loss point;
    whether it fooled; the best loss."""
    marks = set(checkpoints(steps))
    x_adv = start
    loss, grad, fooled = _loss_grad(model, x_adv, y)
    best_x, best_loss, best_grad = x_adv, loss, grad
    fool_x = x_adv
    step = torch.full_like(loss, INITIAL_STEP_FACTOR * eps)
    previous = x_adv
    raised = torch.zeros_like(loss)  # steps since the last checkpoint that raised the loss
    last_mark, best_at_mark = 0, best_loss
    halved_at_mark = torch.zeros_like(fooled)
    for k in range(steps):
        z = project_linf(x_adv + _per_sample(step, x) * grad.sign(), x, eps)
        weight = 1.0 if k == 0 else MOMENTUM
        previous, x_adv = x_adv, project_linf(x_adv + weight * (z - x_adv) + (1 - weight) * (x_adv - previous), x, eps)
        new_loss, grad, now_fooled = _loss_grad(model, x_adv, y)
        raised += (new_loss > loss).to(raised.dtype)
        loss = new_loss
        fool_x = _rows(now_fooled, x_adv, fool_x)
        fooled = fooled | now_fooled
        better = loss > best_loss
        best_x, best_grad = _rows(better, x_adv, best_x), _rows(better, grad, best_grad)
        best_loss = torch.where(better, loss, best_loss)
        if k + 1 in marks:
            halve = _should_halve(raised, k + 1 - last_mark, halved_at_mark, best_loss, best_at_mark)
            step = torch.where(halve, step * STEP_DECAY, step)
            x_adv, grad, loss = _rows(halve, best_x, x_adv), _rows(halve, best_grad, grad), torch.where(halve, best_loss, loss)
            previous = _rows(halve, best_x, previous)  # momentum starts afresh from the best point
            raised.zero_()
            last_mark, best_at_mark, halved_at_mark = k + 1, best_loss, halve
    return _rows(fooled, fool_x, best_x).detach(), fooled, best_loss


def apgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """APGD with the cross-entropy loss in the L∞ ball of radius eps, `steps` iterations per restart.

    Each restart begins at a uniformly random point of the ball (from `generator`, see
    `dvtrain.eval.attacks`) and only images not yet fooled are attacked again. Returns per image the
    adversarial image that fools the model if any run found one, else the highest-loss point found.
    """
    x = x.detach()
    result, fooled = x.clone(), torch.zeros(len(y), dtype=torch.bool, device=x.device)
    best_loss = torch.full((len(y),), -math.inf, device=x.device)
    for _ in range(restarts):
        todo = (~fooled).nonzero().flatten()
        if len(todo) == 0:
            break
        xs = x[todo]
        start = (xs + (2 * _noise(torch.rand, xs.shape, xs, generator) - 1) * eps).clamp(0.0, 1.0)
        adv, hit, loss = _apgd_run(model, xs, y[todo], eps, steps, start)
        keep = hit | (loss > best_loss[todo])
        result[todo[keep]] = adv[keep]
        fooled[todo] = hit
        best_loss[todo] = torch.maximum(loss, best_loss[todo])
    return result
