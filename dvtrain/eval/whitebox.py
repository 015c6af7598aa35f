"""The robustness table: every submodel and the whole ensemble under every white-box attack.

The ensemble is scored as the `Mixture` of its submodels and attacked end to end, so the adversary
sees the same averaged prediction that is being scored. Each (model, attack) cell draws its random
start from its own generator derived from the run seed, so a cell does not depend on which other cells
were computed, and re-running an evaluation reproduces it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dvtrain.eval.attacks import fgsm, pgd_l2, pgd_linf
from dvtrain.config import EvalConfig
from dvtrain.mixture import Mixture
from dvtrain.distributed.placement import LocalPlacement, Placement
from dvtrain.rng import stream

ATTACKS = ("clean", "fgsm", "pgd_linf", "pgd_l2")
RESTARTED = ("pgd_linf", "pgd_l2")  # the attacks with random starts
_HEADERS = {"clean": "Clean", "fgsm": "FGSM", "pgd_linf": "PGD L∞", "pgd_l2": "PGD L2"}


def attack_eps(attack: str, eval_cfg: EvalConfig) -> float:
    """The budget an attack runs with (0 for clean images)."""
    return {"clean": 0.0, "fgsm": eval_cfg.eps, "pgd_linf": eval_cfg.eps, "pgd_l2": eval_cfg.l2_eps}[attack]


def _perturb(model: nn.Module, x: Tensor, y: Tensor, attack: str, cfg: EvalConfig, generator: torch.Generator) -> Tensor:
    if attack == "clean":
        return x
    if attack == "fgsm":
        return fgsm(model, x, y, cfg.eps)
    if attack == "pgd_linf":
        return pgd_linf(model, x, y, cfg.eps, cfg.step_size, cfg.steps, cfg.random_start, generator)
    if attack == "pgd_l2":
        return pgd_l2(model, x, y, cfg.l2_eps, cfg.l2_step_size, cfg.steps, cfg.random_start, generator)
    raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, attack: str, eval_cfg: EvalConfig, batch_size: int, generator: torch.Generator
) -> float:
    """Accuracy in percent on attacked copies of x, in batches so large test sets fit in memory.

    The PGD attacks run `eval_cfg.restarts` times, each from the generator's next random starts; an
    image counts as robust only if it withstands every run, as the reference evaluation counts restarts.
    """
    runs = eval_cfg.restarts if attack in RESTARTED else 1
    correct = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for _ in range(runs):
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            x_adv = _perturb(model, xb, yb, attack, eval_cfg, generator)
            with torch.no_grad():
                correct[start : start + batch_size] &= model(x_adv).argmax(dim=1) == yb
    return 100.0 * int(correct.sum()) / len(y)


def evaluate_stage(
    stage: str, submodels: list[nn.Module], x: Tensor, y: Tensor, eval_cfg: EvalConfig, seed: int,
    placement: Placement | None = None,
) -> list[dict]:
    """Rows {stage, model, attack, eps, accuracy} for each submodel and the mixture under each attack.

    `submodels` are the ones `placement` says this process owns (all of them by default): each
    process scores its own, and all take part in attacking the mixture. Every process returns every
    row. Models are scored in eval mode (BatchNorm running statistics, as at test time) and handed
    back in the mode they came in.
    """
    placement = placement if placement is not None else LocalPlacement(len(submodels))
    if eval_cfg.num_examples > 0:
        x, y = x[: eval_cfg.num_examples], y[: eval_cfg.num_examples]
    was_training = [model.training for model in submodels]

    def score(name: str, model: nn.Module, attack: str) -> float:
        return robust_accuracy(model, x, y, attack, eval_cfg, eval_cfg.batch_size, stream(seed, "eval", name, attack))

    try:
        for model in submodels:
            model.eval()
        owned = torch.tensor(
            [[score(f"sub{i}", model, attack) for attack in ATTACKS] for i, model in zip(placement.owned, submodels)],
            dtype=torch.float64,
            device=x.device,
        )
        table = {f"sub{i}": accs.tolist() for i, accs in enumerate(placement.all_gather(owned))}
        mixture = Mixture(submodels, placement)
        table["mixture"] = [score("mixture", mixture, attack) for attack in ATTACKS]
    finally:
        for model, mode in zip(submodels, was_training):
            model.train(mode)
    return [
        {"stage": stage, "model": name, "attack": attack, "eps": float(attack_eps(attack, eval_cfg)), "accuracy": acc}
        for name, accs in table.items()
        for attack, acc in zip(ATTACKS, accs)
    ]


def _model_label(stage: str, model: str) -> str:
    if model == "mixture":
        return "Mixture (plain ensemble)" if stage == "vanilla" else "Mixture"
    return f"Submodel {int(model.removeprefix('sub')) + 1}"


def _format_eps(eps: float) -> str:
    """ε as k/255 when it is one (the usual way of writing image budgets), else as a short decimal."""
    k = round(eps * 255)
    return f"{k}/255" if 0 < k < 255 and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def results_markdown(rows: list[dict]) -> str:
    """One table per stage, in order of first appearance: a row per model, a column per attack."""
    stages = list(dict.fromkeys(row["stage"] for row in rows))
    out = []
    for stage in stages:
        cells = {(r["model"], r["attack"]): r for r in rows if r["stage"] == stage}
        models = list(dict.fromkeys(model for model, _ in cells))
        header = ["Model"]
        for attack in ATTACKS:
            eps = next((r["eps"] for (_, a), r in cells.items() if a == attack), 0.0)
            budget = f" ε={_format_eps(eps)}" if attack != "clean" else ""
            header.append(f"{_HEADERS[attack]}{budget} (%)")
        lines = [f"### {stage}", "", "| " + " | ".join(header) + " |", "|---" + "|---:" * len(ATTACKS) + "|"]
        for model in models:
            accs = [f"{cells[(model, a)]['accuracy']:.2f}" if (model, a) in cells else "—" for a in ATTACKS]
            lines.append("| " + " | ".join([_model_label(stage, model), *accs]) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)
