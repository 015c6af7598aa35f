"""AutoAttack from the trusted implementation: Croce & Hein's auto-attack as packaged in `pyautoattack`.

AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020) is the attack set RobustBench requires of an L∞/L2 claim: APGD-CE,
APGD-T, FAB-T and Square in its standard version. dvtrain does not re-implement it (its own APGD-CE
was dropped in favour of the library's); this module only sets the budget from `AutoAttackConfig` and
turns the library's adversarial batch into a per-image robustness mask.

The model may be any `nn.Module` that returns logits for images in [0, 1]; a `Mixture` qualifies,
since its log mean probabilities are logits of the mixture's distribution. The library runs in one
process: every rank must hold the whole model (`dvtrain eval` loads every submodel in one process).
"""

from __future__ import annotations

import logging

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from dvtrain.config import AutoAttackConfig

LIBRARY_LOGGER = "auto-attack"  # the library's logger: its debug lines stay quiet, its warnings are shown
BUDGET_TOLERANCE = 1e-5  # float32 rounding of x + δ when checking the returned images against ε


def autoattack_robust(
    model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, cfg: AutoAttackConfig, seed: int, batch_size: int
) -> Tensor:
    """Per image [N] (bool): still classified correctly after AutoAttack at `eps` in `norm` ("Linf" or "L2").

    x: [N, C, H, W] in [0, 1]; y: [N] class indices. The verdict is re-computed from the returned
    adversarial images (their distance to x is checked against eps), so a library bug cannot pass as
    robustness. Parameters get no `.grad`. Raises RuntimeError if an adversarial image leaves the budget.
    """
    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.WARNING)
    kwargs = {"attacks": list(cfg.attacks)} if cfg.version == "custom" else {}
    adversary = AutoAttack(model, norm=norm, eps=eps, version=cfg.version, seed=seed, device=x.device, **kwargs)
    if cfg.iterations is not None:
        for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
            attack.n_iter = cfg.iterations
    if cfg.square_queries is not None:
        adversary.square.n_queries = cfg.square_queries
    # The library back-propagates into the parameters too: freeze them so no `.grad` is left behind.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        x_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)[0]
    finally:
        for p in frozen:
            p.requires_grad_(True)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "Linf" else torch.linalg.vector_norm(delta, dim=1)
    if bool((size > eps + BUDGET_TOLERANCE).any()):
        raise RuntimeError(f"AutoAttack returned an image {float(size.max()):.6f} away in {norm}, beyond ε={eps}")
    with torch.no_grad():
        return torch.cat([model(x_adv[s : s + batch_size]).argmax(dim=1) for s in range(0, len(y), batch_size)]) == y
