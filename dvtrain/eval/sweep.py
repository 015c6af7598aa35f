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
eval.autoattack version at L∞ on all the sweep's images, the ensemble attack (`dvtrain.eval.attacks.adaptive`)
with eval.adaptive. Both run on the mixture only: they cost tens of PGD runs each, and the claim is
the mixture's. At ε = 0 every attack is the identity, so the clean mask is used for each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dvtrain.config import EvalConfig
from dvtrain.eval.attacks import registry
from dvtrain.eval.share import Share, Tasks
from dvtrain.eval.transfer import percent, table_models
from dvtrain.eval.whitebox import LINF, MIXTURE, Cell, robust_mask
from dvtrain.rng import derive_seed, stream

CLEAN = "clean"


def sweep_config(cfg: EvalConfig, eps: float) -> EvalConfig:
    """eval's configuration for the sweep at `eps`: the sweep's PGD budget (eval.transfer), AutoAttack at L∞."""
    t = cfg.transfer
    return dataclasses.replace(cfg, eps=eps, step_size=t.step_fraction * eps, steps=t.steps, restarts=t.restarts,
                               random_start=True, batch_size=t.batch_size, num_examples=0,
                               autoattack=dataclasses.replace(cfg.autoattack, norms=[LINF], num_examples=0))


def sweep_attacks(model: str, cfg: EvalConfig) -> list[str]:
    """The attacks of eval.transfer.sweep_attacks that run on `model` ("sub<i>" or "mixture")."""
    return [a for a in cfg.transfer.sweep_attacks
            if model == MIXTURE or not (registry.attack(a).sweep_mixture_only or registry.attack(a).mixture_only)]


def epsilon_sweeps(stages: dict[str, list[nn.Module]], x: Tensor, y: Tensor, cfg: EvalConfig, seed: int,
                   share: Share | None = None, bar: tqdm | None = None) -> dict[str, dict]:
    """Robust accuracy (%) of each stage's submodels and mixture at every ε of eval.transfer.sweep_eps,
    per attack and as the per-image worst case over the attacks run on that model at that ε.

    `stages`: stage name → its submodels (eval mode). x [N, C, H, W] in [0, 1], y [N]: the sweep's images
    (`dvtrain eval` hands in the black-box protocol's). Each (stage, model, attack, ε) cell is one task
    of `share` (None: all here) and draws from its own stream of `seed`, so the numbers do not depend on
    the number of processes; `bar` counts this rank's cells' images. Returns, per stage, results.json's "eps_sweep"[stage]: {"eps": [ε],
    "models": [name], "n_images": N, "attacks": {attack: [model][ε] (None where it did not run on that
    model)}, "of": {model: [attacks]}, "worst_case": [model][ε], "steps", "step_fraction", "restarts"}."""
    tasks, finish = sweep_work(stages, x, y, cfg, seed)
    return finish(tasks.map(share, bar))


def sweep_work(stages: dict[str, list[nn.Module]], x: Tensor, y: Tensor, cfg: EvalConfig,
               seed: int) -> tuple[Tasks, Callable[[list], dict[str, dict]]]:
    """`epsilon_sweeps` as work to share: a task per (stage, model, attack, ε) cell (its robustness mask),
    costed by the attack record's passes, and the function that makes the sweeps of their results."""
    t = cfg.transfer
    named = {stage: table_models(subs) for stage, subs in stages.items()}
    # Clean first (the worst case needs it), then every attack at every ε > 0 (at ε = 0 an attack is the identity).
    tasks = [(stage, name, CLEAN, 0.0) for stage, models in named.items() for name in models]
    tasks += [(stage, name, a, float(eps)) for stage, models in named.items() for name in models
              for eps in t.sweep_eps if eps != 0 for a in sweep_attacks(name, cfg)]

    def run(task: tuple[str, str, str, float]) -> Tensor:
        stage, name, attack, eps = task
        model = named[stage][name]
        if attack == CLEAN:
            return robust_mask(model, x, y, Cell(CLEAN, None, 0.0), sweep_config(cfg, 0.0), torch.Generator()).cpu()
        aa_seed = derive_seed(seed, "sweep", "autoattack", name, eps)
        return robust_mask(model, x, y, Cell(attack, LINF, eps), sweep_config(cfg, eps),
                           stream(seed, "sweep", name, attack, eps), stages[stage], None, aa_seed).cpu()

    def cost(task: tuple[str, str, str, float]) -> float:
        stage, name, attack, eps = task
        return registry.attack(attack).passes(sweep_config(cfg, eps)) * (len(stages[stage]) if name == MIXTURE else 1)

    costs = [cost(task) for task in tasks]
    return (Tasks(tasks, costs, run, [len(y)] * len(tasks), "accuracy vs ε"),
            lambda done: _sweeps(named, tasks, done, cfg, len(y)))


def _sweeps(named: dict[str, dict[str, nn.Module]], tasks: list[tuple[str, str, str, float]], done: list[Tensor],
            cfg: EvalConfig, n_images: int) -> dict[str, dict]:
    t = cfg.transfer
    masks = dict(zip(tasks, done))
    out = {}
    for stage, models in named.items():
        per_attack = {a: [[None] * len(t.sweep_eps) for _ in models] for a in dict.fromkeys(t.sweep_attacks)}
        worst = [[None] * len(t.sweep_eps) for _ in models]
        for m, name in enumerate(models):
            clean = masks[(stage, name, CLEAN, 0.0)]
            for k, eps in enumerate(t.sweep_eps):
                cell_masks = [clean if eps == 0 else masks[(stage, name, a, float(eps))] for a in sweep_attacks(name, cfg)]
                for a, mask in zip(sweep_attacks(name, cfg), cell_masks):
                    per_attack[a][m][k] = percent(mask)
                worst[m][k] = percent(torch.stack([clean, *cell_masks]).all(dim=0))
        out[stage] = {"eps": list(t.sweep_eps), "steps": t.steps, "step_fraction": t.step_fraction,
                      "restarts": t.restarts, "n_images": n_images, "models": list(models), "attacks": per_attack,
                      "of": {name: sweep_attacks(name, cfg) for name in models}, "worst_case": worst}
    return out


def epsilon_sweep(submodels: list[nn.Module], x: Tensor, y: Tensor, cfg: EvalConfig, seed: int) -> dict:
    """`epsilon_sweeps` of one ensemble, in this process: its results.json "eps_sweep" entry."""
    return epsilon_sweeps({"": submodels}, x, y, cfg, seed)[""]
