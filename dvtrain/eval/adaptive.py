"""An ensemble-adaptive white-box attack on the mixture: the submodels are reweighed during the attack.

Why: attacking the mixture's averaged objective −log mean_i p_i is weak when the submodels' input
gradients point in different directions, which is exactly what diversity training (DVERGE, ADP,
GAL) produces; the averaged gradient then cancels out. MORA (Yu, Gao & Xu, "MORA: Improving Ensemble
Robustness Evaluation with Model-Reweighing Attack", NeurIPS 2022, arXiv 2211.08008) shows that an
attack which reweighs the submodels inside its objective finds much lower robust accuracy for these
defenses. This is dvtrain's MORA-style attack (written from the paper's idea, not its code):

- the objective of image n is Σ_i w_{i,n} · min(m_i(x_n), κ), where m_i is submodel i's CW margin
  (best other logit − true logit, positive when i is fooled) and κ is `AdaptiveConfig.confidence`;
- the weights w_{·,n} = softmax_i(min(m_i, κ) / T) are recomputed at every step without gradient: a
  preference, as soft as the temperature T makes it, for the submodels closest to flipping; a submodel
  past κ stops pulling, and the effort moves on to the others (fooling most of the mixture's
  probability mass fools the mixture). Unlike the mixture's cross-entropy, no confident submodel can
  drown the others' gradients. On the digits quickstart soft weights (T = 10) beat PGD and sharp
  ones (T ≤ 1) did not (docs/evaluation.md);
- sign steps of `step_fraction · ε` in the L∞ ball from a random start; an image's result is the
  first iterate that fools the mixture (judged on the mixture's own prediction), else the last one.

Across processes it runs through the mixture placement: `share_input` / `gather_outputs` give every
rank all submodels' logits, each rank back-propagates through its owned submodels, and the input
gradient is summed over the ranks; every rank takes the same steps and returns the same images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dvtrain.config import AdaptiveConfig
from dvtrain.distributed.placement import LocalPlacement, Placement
from dvtrain.attacks import linf_random_start, margin, per_sample, project_linf
from dvtrain.mixture import mixture_log_probs


def _submodel_logits(submodels: list[nn.Module], placement: Placement, x: Tensor) -> Tensor:
    """Every submodel's logits [M, N, K], differentiable with respect to x on every rank."""
    x = placement.share_input(x)
    return placement.gather_outputs(torch.stack([model(x) for model in submodels]))


def adaptive_linf(
    submodels: list[nn.Module], x: Tensor, y: Tensor, eps: float, cfg: AdaptiveConfig,
    generator: torch.Generator | None, placement: Placement | None = None,
) -> Tensor:
    """Adversarial images [N, C, H, W] against the mixture of `submodels` within L∞ distance eps of x.

    x: [N, C, H, W] in [0, 1]; y: [N]; `submodels` are the ones `placement` says this process owns
    (all by default), in eval mode. Restarts (each from the generator's next random start) keep an
    image's first fooling point. No parameter `.grad` is touched.
    """
    placement = placement if placement is not None else LocalPlacement(len(submodels))
    x = x.detach()
    step = cfg.step_fraction * eps
    result, fooled = x.clone(), torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for _ in range(cfg.restarts):
        x_adv = linf_random_start(x, eps, generator)
        for k in range(cfg.steps + 1):
            with torch.enable_grad():
                x_in = x_adv.detach().requires_grad_(True)
                logits = _submodel_logits(submodels, placement, x_in)  # [M, N, K]
                margins = torch.stack([margin(z, y) for z in logits]).clamp(max=cfg.confidence)  # [M, N]
                weights = torch.softmax(margins.detach() / cfg.temperature, dim=0)
                objective = (weights * margins).sum()
                now_fooled = mixture_log_probs(logits.detach()).argmax(dim=1) != y
                new = now_fooled & ~fooled
                result = torch.where(per_sample(new, x), x_adv, result)
                fooled |= now_fooled
                if k == cfg.steps:  # the last iterate was judged above; no step after it
                    break
                (grad,) = torch.autograd.grad(objective, x_in)
            x_adv = project_linf(x_adv + step * grad.sign(), x, eps)
        result = torch.where(per_sample(fooled, x), result, x_adv)
    return result.detach()
