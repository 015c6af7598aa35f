"""Gradient-masking checks, printed as pass/warn/skipped lines under each `dvtrain eval` table.

A defense that only hides its gradients looks robust to gradient attacks and is not. Carlini et al.
("On evaluating adversarial robustness", arXiv 1902.06705, §5) and Athalye et al. (ICML 2018) list
the signs; dvtrain checks four on the mixture (the model whose robustness is claimed):

1. an unbounded L∞ attack (ε covering the pixel range) drives accuracy to 0 %;
2. more PGD iterations never raise accuracy (eval.steps vs eval.checks.long_steps);
3. the white-box worst case of the ε sweep is not above black-box transfer accuracy ("all") at any ε,
   on the same images;
4. AutoAttack is not above any PGD row of its norm (per model).
A warning names the likely cause.

Each check compares two numbers measured on the same images (same n and order; a pair on different images
is "skipped" with a line saying why, never a pass), and warns only where the difference is beyond noise: the number that
should be lower lies above the 95 % Wilson interval of the one it is compared with (`beyond_noise`). On
359 images a difference of 3 images (0.8 points) is noise; an attack's result must not be read as a sign
of gradient masking from it (issue 26, finding 7).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from dvtrain.config import EvalConfig
from dvtrain.eval.blackbox import all_accuracy
from dvtrain.eval.report import format_eps, model_label
from dvtrain.eval.stats import PERCENT, wilson_interval
from dvtrain.eval.whitebox import MIXTURE, robust_accuracy
from dvtrain.rng import stream

PASS, WARN, SKIPPED = "pass", "warn", "skipped"  # skipped: the check could not be made (never a pass)
EPS_MATCH = 1e-12  # the sweep and the black-box table read the same eval.transfer.sweep_eps values


def beyond_noise(value: float, reference: float, n: int) -> bool:
    """Whether `value` (%) is above the 95 % Wilson interval of `reference` (%), both measured on the same n
    images: a difference that sampling noise of n images does not explain."""
    return value > wilson_interval(reference / PERCENT * n, n)[1]


def _interval_text(reference: float, n: int) -> str:
    low, high = wilson_interval(reference / PERCENT * n, n)
    return f"[{low:.1f}, {high:.1f}]"


def _versus(eps: float, white: float, black: float) -> str:
    return f"ε={format_eps(eps)}: {white:.2f} {'≤' if white <= black else '>'} {black:.2f} %"


def whitebox_vs_blackbox(blackbox: dict, sweep: dict | None) -> str:
    """Check 3's line: at every ε of both, the mixture's worst case over the sweep's white-box attacks vs its
    black-box "all" accuracy, compared only where both count the same test images (equal image digests,
    `dvtrain.digest.images_digest`), since a few images of difference can flip the verdict.
    Transfer examples beating every white-box attack on the same images is the classic sign of
    gradient masking (Athalye et al., ICML 2018, §3)."""
    if sweep is None or "worst_case" not in sweep or "all" not in blackbox:
        return f"{SKIPPED}: white-box vs black-box: no ε sweep with a worst case or no black-box \"all\" column"
    if sweep.get("images") is None or sweep.get("images") != blackbox.get("images"):
        return (f"{SKIPPED}: white-box vs black-box: the ε sweep and the black-box table counted different test "
                "images (evaluate both with one eval.transfer)")
    white = sweep["worst_case"][sweep["models"].index(MIXTURE)]
    pairs = [(eps, white[k], all_accuracy(blackbox, MIXTURE, eps)) for k, eps in enumerate(sweep["eps"])]
    pairs = [(eps, w, b) for eps, w, b in pairs if w is not None and b is not None]
    if not pairs:
        return (f"{SKIPPED}: white-box vs black-box: no ε in both the sweep and the black-box table "
                "(eval.transfer.sweep_eps)")
    n = sweep["n_images"]
    above = [(eps, w, b) for eps, w, b in pairs if beyond_noise(w, b, n)]
    if not above:
        within = [(e, w, b) for e, w, b in pairs if w > b]
        noise = (f"; above but within the 95 % interval of black-box \"all\" (noise of {n} images, not a sign): "
                 + ", ".join(f"ε={format_eps(e)} {_interval_text(b, n)}" for e, _, b in within)) if within else ""
        return (f"{PASS}: white-box worst case ≤ black-box transfer (\"all\") on the mixture at every ε of the sweep "
                f"({', '.join(_versus(e, w, b) for e, w, b in pairs)}; "
                f"{n} images{noise})")
    return (f"{WARN}: white-box worst case above black-box transfer (\"all\") on the mixture, beyond the 95 % interval, at "
            f"{', '.join(f'ε={format_eps(e)}: {w:.2f} > {b:.2f} % {_interval_text(b, n)}' for e, w, b in above)} ({n} images): "
            "transferred examples beat white-box attacks, the classic sign of gradient masking (obfuscated gradients)")


def masking_probe(mixture: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig, seed: int) -> dict:
    """The two extra attacks the checks need, on the table's images: PGD-L∞ at the unbounded budget and
    PGD-L∞ at eval.eps with long_steps iterations of the same step size; "n": how many images they counted."""
    c = cfg.checks
    if cfg.num_examples > 0:
        x, y = x[: cfg.num_examples], y[: cfg.num_examples]
    unbounded = dataclasses.replace(cfg, eps=c.unbounded_eps, step_size=c.unbounded_step_size, steps=c.long_steps)
    longer = dataclasses.replace(cfg, steps=c.long_steps)
    with torch.no_grad():
        return {
            "unbounded_eps": c.unbounded_eps, "long_steps": c.long_steps, "n": len(y),
            "unbounded": robust_accuracy(mixture, x, y, "pgd_linf", unbounded, cfg.batch_size,
                                         stream(seed, "checks", "unbounded")),
            "long": robust_accuracy(mixture, x, y, "pgd_linf", longer, cfg.batch_size, stream(seed, "checks", "long")),
        }


def _row(rows: list[dict], model: str, attack: str, norm: str | None) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["attack"] == attack and r.get("norm") == norm), None)


def masking_checks(stage: str, rows: list[dict], probe: dict | None, blackbox: dict | None, cfg: EvalConfig,
                   sweep: dict | None = None) -> list[str]:
    """The check lines ("pass: …" / "warn: … likely cause …") for one stage's rows (`dvtrain.eval.whitebox`),
    its black-box table (`dvtrain.eval.blackbox.blackbox_table`) and ε sweep (`dvtrain.eval.sweep`)."""
    lines = []
    if probe is not None:
        eps, acc = probe["unbounded_eps"], probe["unbounded"]
        lines.append(f"{PASS}: PGD-L∞ at ε={format_eps(eps)} ({probe['long_steps']} steps) leaves {acc:.2f} % of the mixture correct"
                     if acc == 0 else
                     f"{WARN}: PGD-L∞ at ε={format_eps(eps)} ({probe['long_steps']} steps) leaves {acc:.2f} % of the mixture "
                     "correct, not 0 %: the attack cannot follow the gradient (gradient masking: saturated or "
                     "non-differentiable outputs) or the evaluation has a bug")
        short = _row(rows, MIXTURE, "pgd_linf", "Linf")
        if short is not None and probe.get("n") is not None and short.get("n") != probe["n"]:
            lines.append(f"{SKIPPED}: PGD-L∞ with {probe['long_steps']} vs {cfg.steps} steps: the rows counted "
                         f"different images (n={probe['n']} vs n={short.get('n')})")
        elif short is not None:
            n = short["n"]
            long, acc = probe["long"], short["accuracy"]
            worse = beyond_noise(long, acc, n)
            verdict = WARN if worse else PASS
            cause = (f", above its 95 % interval {_interval_text(acc, n)}: more iterations helped the model; the step size "
                     "is too large for the budget or the gradients are noisy (gradient masking)" if worse else
                     f", within the 95 % interval {_interval_text(acc, n)} of the shorter attack (noise, not a sign)"
                     if long > acc else "")
            lines.append(f"{verdict}: PGD-L∞ with {probe['long_steps']} steps {long:.2f} % vs {cfg.steps} steps "
                         f"{acc:.2f} % on the mixture ({n} images){cause}")
    if blackbox is not None:
        lines.append(whitebox_vs_blackbox(blackbox, sweep))
    for aa in (r for r in rows if r["attack"] == "autoattack"):
        same = [r for r in rows if r["model"] == aa["model"] and r["attack"].startswith("pgd_") and r.get("norm") == aa["norm"]
                and r.get("eps") == aa.get("eps")]
        # Only rows on the same images: AutoAttack with eval.autoattack.num_examples=k counts the first k.
        pgd = [r for r in same if r.get("n") == aa.get("n")]
        above = [r for r in pgd if beyond_noise(aa["accuracy"], r["accuracy"], r["n"])]
        who = f"{model_label(stage, aa['model'])}, {aa['norm']}"
        if above:
            r = above[0]
            lines.append(f"{WARN}: AutoAttack {aa['accuracy']:.2f} % is above {r['attack']} {r['accuracy']:.2f} % beyond its "
                         f"95 % interval {_interval_text(r['accuracy'], r['n'])} ({who}, {r['n']} images): AutoAttack ran "
                         "with a reduced budget (eval.autoattack) or the gradients mislead APGD (gradient masking)")
        elif pgd:
            within = [r for r in pgd if aa["accuracy"] > r["accuracy"]]
            noise = (f"; above {', '.join(r['attack'] for r in within)} within its 95 % interval (noise, not a sign)"
                     if within else "")
            lines.append(f"{PASS}: AutoAttack {aa['accuracy']:.2f} % ≤ every PGD row on the same {aa.get('n')} images "
                         f"({who}){noise}")
        elif same:
            lines.append(f"{SKIPPED}: AutoAttack vs PGD ({who}): AutoAttack counted n={aa.get('n')} images, the PGD "
                         f"rows n={', '.join(str(r.get('n')) for r in same)} (eval.autoattack.num_examples)")
    return lines
