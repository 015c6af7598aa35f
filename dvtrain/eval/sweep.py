"""Accuracy against ε (the paper's §5 curves, white-box side): at every ε of eval.transfer.sweep_eps, each
configured L∞ attack (eval.transfer.sweep_attacks) on every submodel and the mixture, and per image the
worst case over all of them, so a curve is as low as the strongest attack that was run makes it.

The images are the black-box protocol's (`dvtrain.eval.blackbox.blackbox_images`: the first
eval.transfer.num_images of the order drawn from eval.transfer.seed), so the sweep's worst case and
the black-box "all" column at one ε count the same images and the gradient-masking check "white-box
≤ black-box" (`dvtrain.eval.checks`) compares like with like. Each attack is dvtrain's white-box
attack of the same name (`dvtrain.eval.whitebox.robust_mask`: an image counts as robust only if it is
correct clean and under every restart), with the sweep's PGD budget (eval.transfer.steps of
step_fraction·ε, restarts, random start); AutoAttack (Croce & Hein, ICML 2020) runs the
eval.autoattack version at L∞ on all the sweep's images, the ensemble attack (`dvtrain.eval.adaptive`)
with eval.adaptive. Both run on the mixture only: they cost tens of PGD runs each, and the claim is
the mixture's. At ε = 0 every attack is the identity, so the clean mask is used for each.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from dvtrain.config import EvalConfig
from dvtrain.eval.transfer import percent
from dvtrain.eval.whitebox import LINF, MIXTURE, Cell, robust_mask
from dvtrain.mixture import Mixture
from dvtrain.rng import derive_seed, stream

MIXTURE_ONLY = ("autoattack", "adaptive")  # too costly for every submodel at every ε; the mixture is the claim


def sweep_config(cfg: EvalConfig, eps: float) -> EvalConfig:
    """eval's configuration for the sweep at `eps`: the sweep's PGD budget (eval.transfer), AutoAttack at L∞."""
    t = cfg.transfer
    return dataclasses.replace(cfg, eps=eps, step_size=t.step_fraction * eps, steps=t.steps, restarts=t.restarts,
                               random_start=True, batch_size=t.batch_size, num_examples=0,
                               autoattack=dataclasses.replace(cfg.autoattack, norms=[LINF], num_examples=0))


def sweep_attacks(model: str, cfg: EvalConfig) -> list[str]:
    """The attacks of eval.transfer.sweep_attacks that run on `model` ("sub<i>" or "mixture")."""
    return [a for a in cfg.transfer.sweep_attacks if model == MIXTURE or a not in MIXTURE_ONLY]


def epsilon_sweep(submodels: list[nn.Module], x: Tensor, y: Tensor, cfg: EvalConfig, seed: int) -> dict:
    """Robust accuracy (%) of each submodel and the mixture at every ε of eval.transfer.sweep_eps, per
    attack and as the per-image worst case over the attacks run on that model at that ε.

    x [N, C, H, W] in [0, 1], y [N]: the sweep's images (the caller's; `dvtrain eval` hands in the
    black-box protocol's). Models are expected in eval mode. Each (model, attack, ε) draws from its own
    stream of `seed`. Returns results.json's "eps_sweep"[stage]: {"eps": [ε], "models": [name],
    "n_images": N, "attacks": {attack: [model][ε] (None where it did not run on that model)},
    "of": {model: [attacks]}, "worst_case": [model][ε], "steps", "step_fraction", "restarts"}."""
    t = cfg.transfer
    models = {f"sub{i}": m for i, m in enumerate(submodels)} | {MIXTURE: Mixture(submodels)}
    attacks = list(dict.fromkeys(t.sweep_attacks))
    per_attack = {a: [[None] * len(t.sweep_eps) for _ in models] for a in attacks}
    worst = [[None] * len(t.sweep_eps) for _ in models]
    for m, (name, model) in enumerate(models.items()):
        clean = robust_mask(model, x, y, Cell("clean", None, 0.0), sweep_config(cfg, 0.0), torch.Generator())
        for k, eps in enumerate(t.sweep_eps):
            ecfg = sweep_config(cfg, eps)
            masks = []
            for attack in sweep_attacks(name, cfg):
                cell = Cell(attack, LINF, float(eps))
                if eps == 0:
                    mask = clean
                else:
                    aa_seed = derive_seed(seed, "sweep", "autoattack", name, float(eps))
                    mask = robust_mask(model, x, y, cell, ecfg, stream(seed, "sweep", name, attack, float(eps)),
                                       submodels, None, aa_seed)
                masks.append(mask)
                per_attack[attack][m][k] = percent(mask)
            worst[m][k] = percent(torch.stack([clean, *masks]).all(dim=0))
    return {"eps": list(t.sweep_eps), "steps": t.steps, "step_fraction": t.step_fraction, "restarts": t.restarts,
            "n_images": len(y), "models": list(models), "attacks": per_attack,
            "of": {name: sweep_attacks(name, cfg) for name in models}, "worst_case": worst}
