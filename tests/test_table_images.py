"""Every figure of a robustness table counts the images it was computed on (issue 19, kind 1): a row's
accuracy, n and interval are those of its own images, an attack on a subset reports its own n, and the
worst case covers only the images every attack of its norm saw. No row can exceed its model's clean
accuracy on the same images."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from dvtrain.attacks import pgd_linf
from dvtrain.config import AutoAttackConfig, EvalConfig
from dvtrain.eval import whitebox
from dvtrain.eval.stats import wilson_interval
from dvtrain.eval.whitebox import evaluate_stage
from dvtrain.mixture import Mixture

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
N = 90
BASE = EvalConfig(eps=0.1, steps=2, step_size=0.05, l2_eps=0.5, l2_step_size=0.25, batch_size=32)


def _nets() -> tuple[list[nn.Module], Tensor, Tensor]:
    """Two small nets, briefly fitted to 8x8 images whose class is the bright quadrant (noisy enough
    that clean accuracy stays below 100 % and attacks flip some images)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (N,), generator=g)
    x = 0.4 + 0.25 * torch.randn(N, 1, 8, 8, generator=g)
    for k in range(K):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.15
    x = x.clamp(0, 1)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.eval())
    return models, x, y


@pytest.fixture(scope="module")
def nets():
    return _nets()


def _fake_autoattack(model, x, y, norm, eps, cfg, seed, batch_size):
    """A fast stand-in for the library (same signature and contract): robust under one PGD run."""
    adv = pgd_linf(model, x, y, eps, eps / 2, 2, True, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(adv).argmax(1) == y


def _clean_percent(model: nn.Module, x: Tensor, y: Tensor, n: int) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x[:n]).argmax(1) == y[:n]).double().mean())


def _check_table(rows: list[dict], models: list[nn.Module], x: Tensor, y: Tensor, expected_n: dict) -> None:
    named = {f"sub{i}": m for i, m in enumerate(models)} | {"mixture": Mixture(models)}
    for r in rows:
        n = r["n"]
        assert n == expected_n[(r["attack"], r["norm"])], r
        clean = _clean_percent(named[r["model"]], x, y, n)
        if r["attack"] == "clean":
            assert r["accuracy"] == pytest.approx(clean)
        assert r["accuracy"] <= clean + 1e-9, r  # no row above clean accuracy on its own images
        for acc in r.get("seed_accuracies", [r["accuracy"]]):  # each seed: k of n images, at most clean
            assert acc * n / 100 == pytest.approx(round(acc * n / 100)) and acc <= clean + 1e-9
        low, high = wilson_interval(r["accuracy"] * n / 100, n)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((low, high))
    for model in named:
        own = [r for r in rows if r["model"] == model]
        for worst in (r for r in own if r["attack"] == "worst_case"):
            for r in own:
                if r["norm"] in (worst["norm"], None) and r["attack"] != "worst_case" and r["n"] == worst["n"]:
                    assert worst["accuracy"] <= r["accuracy"] + 1e-9


@pytest.mark.parametrize("attacks, aa_n, table_n", [
    (["clean", "fgsm", "autoattack"], 50, 0),
    (["clean", "pgd_linf", "pgd_l2", "autoattack"], 17, 0),
    (["clean", "fgsm", "pgd_linf_margin", "autoattack", "adaptive"], 40, 60),
    (["clean", "autoattack"], 0, 33),
    (["fgsm", "autoattack", "pgd_l2"], 5, 0),
    (["clean", "fgsm", "pgd_linf"], 20, 45),  # num_examples set, but no AutoAttack: everything on 45
])
def test_every_row_divides_by_its_own_images(nets, monkeypatch, attacks, aa_n, table_n):
    monkeypatch.setattr("dvtrain.eval.attacks.autoattack.autoattack_robust", _fake_autoattack)  # the registry's runner calls it
    models, x, y = nets
    aa = AutoAttackConfig(norms=["Linf", "L2"], num_examples=aa_n)
    cfg = dataclasses.replace(BASE, num_examples=table_n, autoattack=aa, attacks=attacks, seeds=2)
    rows = evaluate_stage("dverge", models, x, y, cfg, seed=0, attacks=attacks)
    images = table_n or N
    subset = min(images, aa_n) if aa_n and "autoattack" in attacks else images
    norms = {("autoattack", "Linf"): subset, ("autoattack", "L2"): subset}
    expected = {(a, n): images for a in ("clean", "fgsm", "pgd_linf", "pgd_l2", "pgd_linf_margin", "adaptive")
                for n in (None, "Linf", "L2")} | norms
    expected |= {("worst_case", n): subset if "autoattack" in attacks else images for n in ("Linf", "L2")}
    _check_table(rows, models, x[:images], y[:images], expected)
    assert any(r["attack"] == "worst_case" for r in rows)


def test_issue_example_autoattack_on_50_images_keeps_clean_on_all(ensemble):
    """The issue's example with the real library: eval.autoattack.num_examples=50 on the digits test set.
    Clean counts every test image; AutoAttack and the worst case count its 50, and stay below the
    clean accuracy of those 50."""
    models, data = ensemble
    x, y = data.x_test, data.y_test
    aa = AutoAttackConfig(version="custom", attacks=["apgd-ce"], norms=["Linf"], iterations=3, num_examples=50)
    cfg = dataclasses.replace(BASE, autoattack=aa, batch_size=500)
    rows = evaluate_stage("dverge", models, x, y, cfg, seed=0, attacks=["clean", "fgsm", "autoattack"])
    expected = {("clean", None): len(y), ("fgsm", "Linf"): len(y), ("autoattack", "Linf"): 50, ("worst_case", "Linf"): 50}
    _check_table(rows, models, x, y, expected)
    mixture = {r["attack"]: r for r in rows if r["model"] == "mixture"}
    assert mixture["clean"]["accuracy"] == pytest.approx(_clean_percent(Mixture(models), x, y, len(y)))
    assert mixture["worst_case"]["accuracy"] <= mixture["autoattack"]["accuracy"]
