"""The ensemble attack on the mixture: the submodels are reweighed per image during the attack (after MORA).

Why: attacking the mixture's averaged objective −log mean_i p_i is weak when the submodels' input
gradients point in different directions, which is exactly what diversity training (DVERGE, ADP,
GAL) produces; the averaged gradient then cancels out. MORA (Yu, Gao & Xu, "MORA: Improving Ensemble
Robustness Evaluation with Model-Reweighing Attack", NeurIPS 2022, arXiv 2211.08008) reweighs the
submodels inside the objective and finds much lower robust accuracy for these defenses. This module is
written from the paper (the authors' repository has no licence; nothing of it is copied). One run:

- logits z_i [N, K] of every submodel i, and the mixture's log-probabilities as one more member
  z_{M+1} (as in the MORA authors' code); all are rescaled per image when their top-2 gap is large,
  z̃_i = z_i / r with r = max(1, max_i gap_i / G) (G = `rescale_gap`), so that a saturated member
  keeps a usable cross-entropy gradient;
- per-image weights from the submodels' tempered softmaxes q_i = softmax(β · z_i) (β = `inverse_temperature`)
  against the mixture's top classes: with P = mean_i softmax(z̃_i) over the members, y the label and c the best other
  class of P, w_i = q_i(c) · (q_i(y) / P(y) + (1 − q_i(c)) / P(c)): large for a submodel that already
  leans towards c and whose vote moves the mixture most. Only members that still classify the image
  correctly count (w_i = 0 once z̃_i is fooled): the effort moves to the ones still resisting;
- the attacked logits blend the mixture and the reweighed submodels,
  b = (1 − s) · log P_mix / gap(log P_mix) + s · Σ_i w_i z̃_i / Σ_i w_i   (s = the blend scale),
  the mixture's log-probabilities normalised by their own top-2 gap (no saturation either);
- loss: cross-entropy of b with the label (untargeted), or minus that with a target class (targeted);
- sign steps from a random start in the L∞ ε-ball, step size `initial_step`·ε decaying to 0 along a
  half cosine, with APGD's heavy-ball momentum (Croce & Hein, ICML 2020) of weight 1 − `momentum` on
  the previous displacement; an image stops at the first iterate that fools the mixture (judged on
  the mixture's own prediction), which is kept.

The schedule (MORA's `standard-t-pre` for a softmax ensemble): one untargeted run per entry of
`blend_scales`, then targeted runs at blend `targeted_scale` towards the mixture's 2nd, 3rd, … most
likely class on the clean image (`target_classes` of them), every run on the images still robust.

Across processes it runs through the mixture placement: `share_input` / `gather_outputs` give every
rank all submodels' logits, each rank back-propagates through its owned submodels, and the input
gradient is summed over the ranks; every rank takes the same steps and returns the same images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.attacks import linf_random_start, project_linf
from dvtrain.config import AdaptiveConfig
from dvtrain.distributed.placement import LocalPlacement, Placement
from dvtrain.mixture import mixture_log_probs

GAP_FLOOR = 1e-12  # keeps the normalised mixture finite where its top two classes tie
WEIGHT_FLOOR = 1e-8  # no submodel still correct: the reweighed term vanishes, the mixture's remains


def _submodel_logits(submodels: list[nn.Module], placement: Placement, x: Tensor) -> Tensor:
    """Every submodel's logits [M, N, K], differentiable with respect to x on every rank."""
    x = placement.share_input(x)
    return placement.gather_outputs(torch.stack([model(x) for model in submodels]))


def top2_gap(scores: Tensor) -> Tensor:
    """Largest minus second largest entry along the last dimension: [..., K] -> [...]."""
    top = scores.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _at(values: Tensor, classes: Tensor) -> Tensor:
    """values[..., n, classes[n]] for values [..., N, K] and classes [N]."""
    return values.gather(-1, classes.expand(*values.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def submodel_weights(logits: Tensor, scaled: Tensor, y: Tensor, inverse_temperature: float) -> Tensor:
    """Per-image weights [M, N] of M members (no gradient), from their logits [M, N, K] and rescaled
    copy `scaled`: w_i = q_i(c)·(q_i(y)/P(y) + (1 − q_i(c))/P(c)) with q_i = softmax(β·z_i),
    P = mean_i softmax(z̃_i) and c the best class of P other than y; 0 for a member whose z̃_i already
    misclassifies (MORA, Yu et al. 2022: only the submodels still correct are reweighed)."""
    with torch.no_grad():
        p = torch.softmax(scaled, dim=-1).mean(dim=0)  # [N, K]
        c = p.scatter(1, y[:, None], float("-inf")).argmax(dim=1)
        q = torch.softmax(inverse_temperature * logits, dim=-1)  # [M, N, K]
        q_c, q_y = _at(q, c), _at(q, y)
        weights = q_c * (q_y / _at(p, y) + (1 - q_c) / _at(p, c))
        return weights * (scaled.argmax(dim=-1) == y)


def blended_logits(logits: Tensor, y: Tensor, scale: float, cfg: AdaptiveConfig) -> Tensor:
    """The logits [N, K] the ensemble attack differentiates, from the submodels' logits [M, N, K]:
    (1 − scale)·(mixture log-probabilities / their top-2 gap) + scale·(weighted mean of the rescaled
    members), weights from `submodel_weights` (see the module docstring). The members are the M
    submodels and the mixture's log-probabilities, reweighed as one more member, as the MORA authors'
    code does (on the digits quickstart's training images it fooled 1–3 more of 359 per run)."""
    mixture = mixture_log_probs(logits)
    members = torch.cat([logits, mixture[None]])  # [M + 1, N, K]
    with torch.no_grad():
        largest_gap = top2_gap(members).amax(dim=0)  # [N]
        divisor = torch.where(largest_gap > cfg.rescale_gap, largest_gap / cfg.rescale_gap,
                              torch.ones_like(largest_gap))
    scaled = members / divisor[None, :, None]
    weights = submodel_weights(members.detach(), scaled.detach(), y, cfg.inverse_temperature)  # [M + 1, N]
    reweighed = (weights[..., None] * scaled).sum(dim=0) / (weights.sum(dim=0) + WEIGHT_FLOOR)[:, None]
    normalised = mixture / top2_gap(mixture.detach()).clamp_min(GAP_FLOOR)[:, None]
    return (1 - scale) * normalised + scale * reweighed


def step_size(k: int, steps: int, eps: float, cfg: AdaptiveConfig) -> float:
    """Step k (0-based) of `steps`: initial_step·ε·(1 + cos(πk/steps))/2 (MORA's cosine decay)."""
    return cfg.initial_step * eps * (1 + math.cos(math.pi * k / steps)) / 2


def ensemble_attack_run(
    submodels: list[nn.Module], placement: Placement, x: Tensor, y: Tensor, target: Tensor | None, eps: float,
    scale: float, cfg: AdaptiveConfig, generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One run on images x [N, C, H, W] in [0, 1] with labels y [N]: untargeted when `target` is None,
    else towards target [N]. Returns (images [N, C, H, W] within ε of x, fooled [N] bool): an image
    fooled at some iterate keeps that iterate, the others end at the last one."""
    x_adv = linf_random_start(x, eps, generator)
    previous = x_adv.clone()
    fooled = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for k in range(cfg.steps + 1):
        active = (~fooled).nonzero().squeeze(1)
        if len(active) == 0:
            break
        xa, ya = x_adv[active], y[active]
        with torch.enable_grad():
            x_in = xa.detach().requires_grad_(True)
            logits = _submodel_logits(submodels, placement, x_in)  # [M, n, K]
            now = mixture_log_probs(logits.detach()).argmax(dim=1) != ya
            fooled[active[now]] = True
            if k == cfg.steps:  # the last iterate was judged above; no step after it
                break
            blend = blended_logits(logits, ya, scale, cfg)
            if target is None:
                loss = F.cross_entropy(blend, ya, reduction="sum")
            else:
                loss = -F.cross_entropy(blend, target[active], reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_in)
        with torch.no_grad():
            xo = x[active]
            sign_step = project_linf(xa + step_size(k, cfg.steps, eps, cfg) * grad.sign(), xo, eps)
            weight = 1.0 if k == 0 else cfg.momentum  # no previous displacement at the first step
            moved = project_linf(xa + weight * (sign_step - xa) + (1 - weight) * (xa - previous[active]), xo, eps)
            keep = active[~now]
            previous[keep] = xa[~now]
            x_adv[keep] = moved[~now]
    return x_adv.detach(), fooled


def adaptive_linf(
    submodels: list[nn.Module], x: Tensor, y: Tensor, eps: float, cfg: AdaptiveConfig,
    generator: torch.Generator | None, placement: Placement | None = None,
) -> Tensor:
    """Adversarial images [N, C, H, W] against the mixture of `submodels` within L∞ distance eps of x.

    x: [N, C, H, W] in [0, 1]; y: [N]; `submodels` are the ones `placement` says this process owns
    (all by default), in eval mode. Runs the schedule of the module docstring, each run (and each of
    `cfg.restarts` repetitions of it, from the generator's next random starts) on the images the
    mixture still classifies correctly; an image keeps the first iterate that fools the mixture, and
    an image never fooled (or misclassified already) is returned unchanged. No parameter `.grad` is touched.
    """
    placement = placement if placement is not None else LocalPlacement(len(submodels))
    x = x.detach()
    with torch.no_grad():
        clean = mixture_log_probs(_submodel_logits(submodels, placement, x))
    robust = clean.argmax(dim=1) == y
    ranked = clean.argsort(dim=1, descending=True)  # targets: the mixture's 2nd, 3rd, … class
    runs: list[tuple[float, int | None]] = [(s, None) for s in cfg.blend_scales]
    runs += [(cfg.targeted_scale, rank) for rank in range(1, min(cfg.target_classes, clean.shape[1] - 1) + 1)]
    result = x.clone()
    for _ in range(cfg.restarts):
        for scale, rank in runs:
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                return result
            target = None if rank is None else ranked[idx, rank]
            adv, fooled = ensemble_attack_run(submodels, placement, x[idx], y[idx], target, eps, scale, cfg, generator)
            result[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
    return result
