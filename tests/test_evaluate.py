"""The Mixture's arithmetic and gradients, and the evaluation table built on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.attacks import fgsm
from dvtrain.config import EvalConfig
from dvtrain.eval.report import format_eps, results_markdown
from dvtrain.eval.whitebox import cells, evaluate_stage, robust_accuracy, robust_mask
from dvtrain.mixture import Mixture, mixture_log_probs

K = 4


def linear_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))


def batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, K, (n,), generator=g)


@pytest.fixture(scope="module")
def trained() -> tuple[list[nn.Module], Tensor, Tensor]:
    """Two small nets fitted to separable 8x8 data (class = which quadrant is bright)."""
    g = torch.Generator().manual_seed(0)
    n = 600
    y = torch.randint(0, K, (n,), generator=g)
    x = 0.35 + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    for k in range(K):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.3
    x = x.clamp(0, 1)
    models = []
    for seed in (1, 2):
        model = linear_net(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(100):
            loss = F.cross_entropy(model(x[:500]), y[:500])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.zero_grad(set_to_none=True)
        models.append(model)
    return models, x[500:], y[500:]


# ----------------------------------------------------------------------------- Mixture


def test_mixture_is_the_log_of_the_mean_softmax():
    models = [linear_net(s) for s in range(3)]
    x, y = batch(10, 0)
    mixture = Mixture(models)
    out = mixture(x)
    manual = torch.stack([F.softmax(m(x), dim=1) for m in models]).mean(0)
    assert torch.allclose(out.exp(), manual, atol=1e-6)
    assert torch.allclose(mixture.mean_probs(x), manual, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(10), atol=1e-6)
    # cross-entropy on the mixture is -log mean_i p_i(y|x), with no extra softmax distortion
    expected = -manual[torch.arange(10), y].log().mean()
    assert torch.allclose(F.cross_entropy(out, y), expected, atol=1e-6)


def test_mixture_log_probs_is_stable_for_huge_logits():
    logits = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])  # two confident, opposite submodels
    out = mixture_log_probs(logits)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.full((1, 2), math.log(0.5)), atol=1e-6)


def test_mixture_gradient_reaches_every_submodel():
    models = [linear_net(s) for s in range(3)]
    x, y = batch(8, 1)
    F.cross_entropy(Mixture(models)(x), y).backward()
    for model in models:
        for p in model.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- evaluation

ATTACKS = ["clean", "fgsm", "pgd_linf", "pgd_l2"]
CFG = EvalConfig(eps=0.1, steps=3, step_size=0.04, l2_eps=0.5, l2_step_size=0.2, random_start=True, batch_size=32,
                 attacks=ATTACKS)
NORMS = {"clean": None, "fgsm": "Linf", "pgd_linf": "Linf", "pgd_l2": "L2"}


def test_evaluate_stage_rows_and_determinism(trained):
    models, x, y = trained
    models[0].train()
    models[1].eval()
    rows = evaluate_stage("dverge", models, x, y, CFG, seed=0)
    assert models[0].training and not models[1].training  # modes handed back
    order = [*ATTACKS, "worst_case", "worst_case"]
    assert [(r["model"], r["attack"]) for r in rows] == [(m, a) for m in ("sub0", "sub1", "mixture") for a in order]
    for row in rows:
        assert set(row) >= {"stage", "model", "attack", "norm", "eps", "accuracy", "n", "ci_low", "ci_high"}
        assert row["stage"] == "dverge" and row["n"] == len(y)
        assert isinstance(row["eps"], float) and isinstance(row["accuracy"], float)
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 100.0
        if row["attack"] != "worst_case":
            assert row["norm"] == NORMS[row["attack"]]
        assert row["eps"] == {None: 0.0, "Linf": 0.1, "L2": 0.5}[row["norm"]]
    acc = {(r["model"], r["attack"]): r["accuracy"] for r in rows if r["attack"] != "worst_case"}
    with torch.no_grad():
        for i, model in enumerate(models):
            assert acc[(f"sub{i}", "clean")] == pytest.approx(float((model(x).argmax(1) == y).float().mean() * 100))
    for name in ("sub0", "sub1", "mixture"):
        assert acc[(name, "clean")] >= 90.0
        assert acc[(name, "pgd_linf")] < acc[(name, "clean")]
    assert evaluate_stage("dverge", models, x, y, CFG, seed=0) == rows


def test_num_examples_uses_the_first_n(trained):
    models, x, y = trained
    cfg = EvalConfig(**{**vars(CFG), "num_examples": 10, "batch_size": 3})
    rows = evaluate_stage("vanilla", models, x, y, cfg, seed=0)
    full = evaluate_stage("vanilla", models, x[:10], y[:10], EvalConfig(**{**vars(CFG), "batch_size": 3}), seed=0)
    # The same rows; only the split they were drawn from differs (its digest, "test_split").
    assert [{k: v for k, v in r.items() if k != "test_split"} for r in rows] == [
        {k: v for k, v in r.items() if k != "test_split"} for r in full]
    assert {r["test_split"] for r in rows} != {r["test_split"] for r in full}
    assert all(r["accuracy"] / 10 == pytest.approx(round(r["accuracy"] / 10)) for r in rows)  # k of 10 images


def test_robust_accuracy_does_not_depend_on_batching(trained):
    """FGSM's sign is unchanged by the mean over a batch, so any batch size gives the same images."""
    models, x, y = trained
    model = models[0].eval()
    one = robust_accuracy(model, x, y, "fgsm", CFG, len(y), torch.Generator())
    assert robust_accuracy(model, x, y, "fgsm", CFG, 7, torch.Generator()) == one
    adv = fgsm(model, x, y, CFG.eps)
    with torch.no_grad():
        assert one == pytest.approx(float((model(adv).argmax(1) == y).float().mean() * 100))
    with pytest.raises(ValueError, match="unknown attack"):
        robust_accuracy(model, x, y, "cw", CFG, 32, torch.Generator())
    with pytest.raises(ValueError, match="unknown attack loss"):
        fgsm(model, x, y, CFG.eps, loss="hinge")


@pytest.mark.parametrize("attack", ["pgd_linf", "pgd_l2"])
def test_restarts_count_an_image_robust_only_if_every_run_fails(attack):
    """Restart r continues the cell's generator, so the runs can be replayed one by one by hand."""
    model = linear_net(7).eval()
    x, _ = batch(100, 1)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels it gets right: what one attack run flips depends on its start
    weak = EvalConfig(**{**vars(CFG), "eps": 0.1, "l2_eps": 0.5, "steps": 1, "restarts": 4})
    got = robust_accuracy(model, x, y, attack, weak, 40, torch.Generator().manual_seed(5))

    replay, survives, per_run = torch.Generator().manual_seed(5), torch.ones(len(y), dtype=torch.bool), []
    single = EvalConfig(**{**vars(weak), "restarts": 1})
    single = EvalConfig(**{**vars(single), "batch_size": 40})
    (cell,) = cells([attack], single)
    for _ in range(weak.restarts):
        correct = robust_mask(model, x, y, cell, single, replay)
        survives &= correct
        per_run.append(100.0 * int(correct.sum()) / len(y))
    assert got == pytest.approx(100.0 * int(survives.sum()) / len(y))
    assert got <= min(per_run) and got < max(per_run)  # the restarts found images one run missed
    first = robust_accuracy(model, x, y, attack, single, 40, torch.Generator().manual_seed(5))
    assert first == per_run[0]  # restarts=1 is the attack as before


def test_restarts_need_random_starts():
    from dvtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.restarts=3 needs eval.random_start=true"):
        load_config(None, ["eval.restarts=3", "eval.random_start=false"])


def test_results_markdown_renders_a_table_per_stage():
    rows = []
    for stage in ("vanilla", "dverge"):
        for model, base in (("sub0", 90.0), ("sub1", 80.5), ("mixture", 95.123)):
            for k, attack in enumerate([*ATTACKS, "worst_case"]):
                norm = NORMS.get(attack, "Linf")
                eps = {None: 0.0, "Linf": 0.03, "L2": 8 / 255}[norm]
                rows.append({"stage": stage, "model": model, "attack": attack, "norm": norm, "eps": eps,
                             "accuracy": base - 10 * k, "n": 200, "ci_low": base - 10 * k - 1.25, "ci_high": base - 10 * k + 1})
    text = results_markdown(rows, {"dverge": ["pass: a check"]})
    assert text.index("### vanilla") < text.index("### dverge")
    header = ("| Model | Clean (%) | **Worst case** L∞ ε=0.03 (%) | FGSM L∞ ε=0.03 (%) | PGD L∞ ε=0.03 (%) "
              "| PGD L2 ε=8/255 (%) |")
    assert text.count(header) == 2
    assert text.count("n = 200 test images (each column's own, see budgets); accuracy (%) with its 95 % Wilson interval") == 2
    vanilla, dverge = text.split("### dverge")
    assert "| Submodel 1 | 90.00 [88.8, 91.0] | 50.00 [48.8, 51.0] | 80.00 [78.8, 81.0] | 70.00 [68.8, 71.0] | 60.00 [58.8, 61.0] |" in vanilla
    assert "| Mixture (plain ensemble) | 95.12 [93.9, 96.1] |" in vanilla
    assert "| Mixture | 95.12 [93.9, 96.1] |" in dverge and "plain ensemble" not in dverge
    assert "- pass: a check" in dverge and "pass:" not in vanilla
    table = [line for line in vanilla.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and all(line.count("|") == 7 for line in table)


def test_budgets_print_as_fractions_of_255_only_below_one():
    assert (format_eps(8 / 255), format_eps(0.03), format_eps(1.0), format_eps(2.0)) == ("8/255", "0.03", "1", "2")
