"""The ensemble attack (dvtrain.eval.attacks.adaptive, after MORA): its step schedule, weights and blend written
out, and its strength on a trained digits mixture against margin PGD and pyautoattack's APGD-CE.
(Its 1-vs-2-process equivalence and parameter hygiene: tests/test_robust_eval.py.)"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY
from dvtrain import cli
from dvtrain.attacks import pgd_linf
from dvtrain.config import AdaptiveConfig, AutoAttackConfig
from dvtrain.eval.attacks.adaptive import adaptive_linf, blended_logits, step_size, submodel_weights, top2_gap
from dvtrain.eval import ensemble_attack_check
from dvtrain.eval.attacks.autoattack import autoattack_robust
from dvtrain.mixture import Mixture, mixture_log_probs
from dvtrain.rng import stream

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.1  # the quickstart's digits budget
N_IMAGES = 120
STRENGTH_STEPS = 30  # a shortened run keeps the test quick; the baselines get their full budgets


def test_step_size_decays_from_twice_eps_along_a_half_cosine():
    cfg = AdaptiveConfig(steps=100)
    sizes = [step_size(k, cfg.steps, EPS, cfg) for k in range(cfg.steps)]
    assert sizes[0] == pytest.approx(2 * EPS) and sizes[50] == pytest.approx(EPS)
    assert sizes[99] == pytest.approx(2 * EPS * (1 + math.cos(math.pi * 0.99)) / 2) and sizes[99] > 0
    assert all(a > b for a, b in zip(sizes, sizes[1:]))


def test_weights_written_out_and_zero_for_fooled_submodels():
    logits = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 3.0, 1.0]], [[1.0, 0.5, 0.0]]])  # [M=3, N=1, K=3]
    y = torch.tensor([0])
    beta = 0.2
    weights = submodel_weights(logits, logits, y, beta)
    p = torch.softmax(logits, -1).mean(0)[0]
    c = 1  # P's best class other than y
    assert p[1] > p[2]
    for i in (0, 2):  # still correct
        q = torch.softmax(beta * logits[i, 0], -1)
        expected = q[c] * (q[0] / p[0] + (1 - q[c]) / p[c])
        assert float(weights[i, 0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(weights[1, 0]) == 0.0  # submodel 1 already says class 1


def test_blend_ends_are_the_normalised_mixture_and_the_rescaled_members():
    """Scale 0: the mixture's log-probabilities over their top-2 gap. Scale 1 with identical submodels:
    every member (the submodels' logits z and the mixture's log_softmax(z) = z − logsumexp z) rescaled
    alike, so the blend is the rescaled z up to a per-image constant, which moves no cross-entropy."""
    torch.manual_seed(0)
    one = torch.randn(4, 5) * 30  # large gaps: rescaled so that the largest top-2 gap is rescale_gap
    logits = torch.stack([one, one, one])
    y = one.argmax(1)  # all correct
    cfg = AdaptiveConfig()
    mixture = mixture_log_probs(logits)
    torch.testing.assert_close(blended_logits(logits, y, 0.0, cfg), mixture / top2_gap(mixture)[:, None])
    gap = top2_gap(one)
    expected = one / torch.where(gap > cfg.rescale_gap, gap / cfg.rescale_gap, torch.ones_like(gap))[:, None]
    shift = blended_logits(logits, y, 1.0, cfg) - expected  # [N, K]: the same in every class
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-4)
    assert float(top2_gap(blended_logits(logits, y, 1.0, cfg)).max()) <= cfg.rescale_gap + 1e-4


def test_at_least_as_strong_as_margin_pgd_and_apgd_ce_on_a_trained_mixture(ensemble):
    """Robust count (mixture still correct) under the ensemble attack, even shortened to 30 steps a run,
    ≤ margin PGD's (100 steps of ε/4) and ≤ pyautoattack's APGD-CE (its own 100 iterations), on the same
    images (measured: 61 vs 63 and 63 of 110 correct when clean)."""
    models, data = ensemble
    x, y = data.x_test[:N_IMAGES], data.y_test[:N_IMAGES]
    mixture = Mixture(models).eval()
    adv = adaptive_linf(models, x, y, EPS, AdaptiveConfig(steps=STRENGTH_STEPS), stream(0, "strength"))
    assert float((adv - x).abs().max()) <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        ours = int((mixture(adv).argmax(1) == y).sum())
        pgd = pgd_linf(mixture, x, y, EPS, EPS / 4, 100, True, stream(0, "pgd"), loss="cw")
        margin_pgd = int((mixture(pgd).argmax(1) == y).sum())
        clean = int((mixture(x).argmax(1) == y).sum())
    apgd = int(autoattack_robust(mixture, x, y, "Linf", EPS, AutoAttackConfig(version="custom", attacks=["apgd-ce"]),
                                 0, N_IMAGES).sum())
    assert ours <= margin_pgd and ours <= apgd
    assert ours < clean  # the comparison is not vacuous


def test_targeted_runs_only_add_fooled_images(ensemble):
    """The schedule's runs each attack the images still robust: adding the targeted runs can only lower
    the robust count, and an untargeted-only schedule returns unchanged images where it failed."""
    models, data = ensemble
    x, y = data.x_test[:40], data.y_test[:40]
    mixture = Mixture(models).eval()
    short = AdaptiveConfig(steps=10, blend_scales=[0.5], target_classes=0)
    untargeted = adaptive_linf(models, x, y, EPS, short, stream(0, "t"))
    both = adaptive_linf(models, x, y, EPS, dataclasses.replace(short, target_classes=9), stream(0, "t"))
    with torch.no_grad():
        robust_u, robust_b = mixture(untargeted).argmax(1) == y, mixture(both).argmax(1) == y
    assert bool((robust_b <= robust_u).all())
    assert torch.equal(untargeted[robust_u], x[robust_u])


def test_the_settings_check_runs_as_a_module(tmp_path, capsys):
    """`python -m dvtrain.eval.ensemble_attack_check RUN STAGE` (docs/evaluation.md, "The ensemble attack") on a
    trained run: one line per attack run, in order, each a robust count of the N images no larger than the
    clean count; an unfinished stage is one line and exit status 2."""
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]", "vanilla.epochs=3",
                           "data.train_limit=512"]) == 0
    capsys.readouterr()
    n = 24
    # (--skip apgd: APGD-CE would double the time; the strength test above runs it on the same kind of mixture)
    assert ensemble_attack_check.main([str(run_dir), "vanilla", "--split", "test", "--n", str(n), "--skip", "apgd",
                                       "steps=2", "target_classes=1", "blend_scales=[0.5]"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = ["clean", "margin PGD", "ensemble attack"]
    assert len(lines) == len(names) and all(f" eps=0.1 {name}" in line for name, line in zip(names, lines))
    assert all(line.startswith(f"vanilla test[:{n}] ") for line in lines)
    counts = [int(re.search(r": (\d+) robust \(", line).group(1)) for line in lines]
    assert 0 < counts[0] <= n and all(c <= counts[0] for c in counts[1:])
    assert "steps: 2" in lines[-1] and "target_classes: 1" in lines[-1]  # the overrides reached eval.adaptive
    refused = subprocess.run([sys.executable, "-m", "dvtrain.eval.ensemble_attack_check", str(run_dir), "dverge"],
                             capture_output=True, text=True, cwd=REPO, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2 and refused.stderr.startswith("dvtrain: error: ") and refused.stderr.count("\n") == 1
