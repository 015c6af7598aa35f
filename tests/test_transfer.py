"""Transferability matrix, AutoAttack's APGD-CE, black-box transfer, ε sweep and the whole `full_evaluation`, on
small conv nets trained for seconds on the digits data; FGSM/PGD cross-checked against an
independent implementation on the same weights and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import TINY
from dvtrain import cli
from dvtrain.eval import blackbox
from dvtrain.attacks import fgsm, pgd_linf
from dvtrain.eval.attacks.autoattack import autoattack_robust
from dvtrain.config import AutoAttackConfig, ConfigError, EvalConfig, TransferConfig, check_section, load_config
from dvtrain.errors import DvtrainError
from dvtrain.eval.evaluate import full_evaluation
from dvtrain.data import load_dataset
from dvtrain.eval.whitebox import robust_accuracy
from dvtrain.mixture import Mixture
from dvtrain.rng import stream
from dvtrain.train.loop import train_in_process
from dvtrain.eval.blackbox import ExampleSet, attack_budget, blackbox_table, craft
from dvtrain.eval.attacks.mi_fgsm import DiverseInputs, momentum_pgd
from dvtrain.eval.sweep import epsilon_sweep
from dvtrain.eval.report import mean_off_diagonal
from dvtrain.eval.transfer import correct_by_all, shuffled_test_set, transfer_matrix

EPS = 0.1  # digits are 8×8 and coarse: the quickstart's evaluation budget
SEED = 0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
APGD_ITERATIONS = 20  # per restart; PGD gets the same number of steps
TIE_TOLERANCE = 1.0  # percentage points (≈3 of 359 images)
CROSSCHECK_IMAGES = 200
FAST = TransferConfig(num_images=150, batch_size=64, eps=EPS, steps=5, restarts=1, sweep_eps=[0.0, 0.05, EPS],
                      surrogate_sizes=[2], surrogate_epochs=1, blackbox_steps=3, blackbox_restarts=2)

# Correctness, not speed: tiny nets run several times faster on one thread of a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean() * 100)


# ----------------------------------------------------------------------------- transferability


def test_transfer_diagonal_equals_whitebox_pgd_success(ensemble):
    models, data = ensemble
    x, y = shuffled_test_set(data, SEED)
    matrix = transfer_matrix(models, x, y, FAST, SEED)
    keep = correct_by_all(models, x, y, FAST.batch_size)
    xs, ys = x[keep][: FAST.num_images], y[keep][: FAST.num_images]
    assert matrix["n_images"] == len(ys) == FAST.num_images  # enough images every submodel gets right
    assert all(accuracy(m, xs, ys) == 100.0 for m in models) and accuracy(Mixture(models), xs, ys) == 100.0
    assert matrix["sources"] == ["sub0", "sub1", "sub2"] and matrix["targets"] == ["sub0", "sub1", "sub2", "mixture"]
    # The white-box evaluation's own PGD-L∞ on the same images, budget, batches and random stream.
    white = EvalConfig(eps=EPS, steps=FAST.steps, step_size=FAST.step_fraction * EPS, random_start=True)
    for i, model in enumerate(models):
        g = stream(SEED, "transfer", f"sub{i}", 0)
        success = 100.0 - robust_accuracy(model, xs, ys, "pgd_linf", white, FAST.batch_size, g)
        assert matrix["success"][i][i] == pytest.approx(success, abs=1e-9)
    diagonal = sum(matrix["success"][i][i] for i in range(3)) / 3
    assert 0.0 < mean_off_diagonal(matrix) < diagonal  # transferred examples fool less than white-box ones
    json.dumps(matrix)  # JSON-able as it goes into results.json


def test_restarts_only_add_successes(ensemble):
    models, data = ensemble
    x, y = shuffled_test_set(data, SEED)
    cfg = TransferConfig(**{**vars(FAST), "num_images": 60, "steps": 3})
    one = transfer_matrix(models, x, y, cfg, SEED)["success"]
    two = transfer_matrix(models, x, y, TransferConfig(**{**vars(cfg), "restarts": 2}), SEED)["success"]
    assert all(b >= a for ra, rb in zip(one, two) for a, b in zip(ra, rb))


def test_mean_off_diagonal_skips_the_diagonal_and_missing_cells():
    matrix = {"sources": ["sub0", "sub1"], "success": [[90.0, 10.0, 5.0], [30.0, 80.0, None]]}
    assert mean_off_diagonal(matrix) == pytest.approx(20.0)
    assert mean_off_diagonal({"sources": ["sub0", "sub1"], "success": [[None, None], [None, None]]}) is None


# ----------------------------------------------------------------------------- FGSM / PGD cross-check


def independent_fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Goodfellow et al. from the paper: summed NLL of log-softmax, .backward() on a leaf input."""
    adv = x.clone().requires_grad_(True)
    F.nll_loss(F.log_softmax(model(adv), dim=1), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return torch.clamp(x + eps * adv.grad.sign(), 0.0, 1.0)


def independent_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
                    uniform: Tensor) -> Tensor:
    """Madry et al.'s PGD from a given uniform start, with a perturbation variable clipped to the box."""
    adv = torch.clamp(x + (2 * uniform - 1) * eps, 0.0, 1.0)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        F.nll_loss(F.log_softmax(model(adv), dim=1), y, reduction="sum").backward()
        adv = adv.detach() + alpha * adv.grad.sign()
        adv = torch.clamp(torch.clamp(adv, min=x - eps, max=x + eps), 0.0, 1.0)
    model.zero_grad(set_to_none=True)
    return adv.detach()


def test_fgsm_and_pgd_match_an_independent_implementation(ensemble):
    models, data = ensemble
    x, y = data.x_test[:CROSSCHECK_IMAGES], data.y_test[:CROSSCHECK_IMAGES]
    cfg = EvalConfig(eps=EPS, steps=10, step_size=EPS / 4, random_start=True)
    for model in (models[0], Mixture(models)):
        ours = fgsm(model, x, y, EPS)
        theirs = independent_fgsm(model, x, y, EPS)
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert robust_accuracy(model, x, y, "fgsm", cfg, len(y), torch.Generator()) == pytest.approx(accuracy(model, theirs, y))

        uniform = torch.rand(x.shape, generator=stream(SEED, "crosscheck"))
        theirs = independent_pgd(model, x, y, EPS, cfg.step_size, cfg.steps, uniform)
        ours = pgd_linf(model, x, y, EPS, cfg.step_size, cfg.steps, True, stream(SEED, "crosscheck"))
        assert torch.allclose(ours, theirs, atol=1e-6)
        ours_acc = robust_accuracy(model, x, y, "pgd_linf", cfg, len(y), stream(SEED, "crosscheck"))
        assert ours_acc == pytest.approx(accuracy(model, theirs, y))
        assert ours_acc < accuracy(model, x, y)


# ----------------------------------------------------------------------------- APGD


def test_autoattack_apgd_ce_is_at_least_as_strong_as_pgd_and_leaves_the_model_alone(ensemble):
    """dvtrain's own APGD-CE was dropped for the library's: on the same ε and iterations per restart
    (PGD with the quickstart's tuned step ε/4), the library's APGD-CE must not fall behind PGD."""
    models, data = ensemble
    x, y = data.x_test, data.y_test
    apgd = AutoAttackConfig(version="custom", attacks=["apgd-ce"], iterations=APGD_ITERATIONS)
    for model in (models[1], Mixture(models)):
        before = [p.detach().clone() for p in model.parameters()]
        robust = autoattack_robust(model, x, y, "Linf", EPS, apgd, SEED, 500)
        pgd = pgd_linf(model, x, y, EPS, EPS / 4, APGD_ITERATIONS, True, stream(SEED, "pgd"))
        assert float(robust.double().mean() * 100) <= accuracy(model, pgd, y) + TIE_TOLERANCE
        assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- black box and ε sweep


def test_diverse_inputs_transform_is_random_differentiable_and_optional(ensemble):
    models, data = ensemble
    x = data.x_test[:8].clone().requires_grad_(True)
    always = DiverseInputs(models[0], 1.0, FAST.di_resize, stream(SEED, "di"))
    outs = [always(x) for _ in range(4)]
    assert outs[0].shape == (8, 10) and any(not torch.equal(outs[0], o) for o in outs[1:])
    (grad,) = torch.autograd.grad(outs[0].sum(), x)
    assert grad.abs().sum() > 0
    never = DiverseInputs(models[0], 0.0, FAST.di_resize, stream(SEED, "di"))
    assert torch.equal(never(x), models[0](x))


def test_blackbox_examples_stay_in_budget_transfer_and_all_is_their_intersection(ensemble):
    models, data = ensemble
    x, y = data.x_test[:120], data.y_test[:120]
    surrogate, targets = Mixture(models[:2]), models[2:]
    cfg = TransferConfig(**{**vars(FAST), "blackbox_steps": 10})
    sets = []
    for eps in (EPS / 2, EPS):
        for attack in ("mi_pgd", "m_di2_fgsm"):
            for loss in ("ce", "cw"):
                budget = attack_budget(attack, cfg)
                runs = torch.stack([craft(surrogate, x, y, attack, loss, eps, budget, stream(SEED, attack, loss, eps, r), 50)
                                    for r in range(budget["runs"])])
                assert len(runs) == (cfg.blackbox_restarts if attack == "mi_pgd" else 1)
                assert (runs - x).abs().max() <= eps + 1e-6 and runs.min() >= 0 and runs.max() <= 1
                sets.append(ExampleSet("ensA" if loss == "ce" else "ensB", attack, loss, eps, runs))  # two groups
    own = blackbox_table(models[:2], sets, y, 50)
    table = blackbox_table(targets, sets, y, 50)
    assert table["models"] == ["sub0", "mixture"] and table["eps"] == [EPS / 2, EPS] and len(table["sets"]) == 8
    for t in (own, table):
        for acc, every in zip(t["accuracy"], t["all"]):
            for k, eps in enumerate(t["eps"]):  # "all" ≤ every set it covers, and exactly their intersection
                covered = [a for a, s in zip(acc, t["sets"]) if s["eps"] == eps]
                assert every[k] <= min(covered)
        assert sorted(t["all_by_surrogate"]) == ["ensA", "ensB"]
        for m in range(len(t["models"])):  # per surrogate ensemble: ≤ each of its sets, ≥ "all"
            for k, eps in enumerate(t["eps"]):
                for name, by in t["all_by_surrogate"].items():
                    own_sets = [a for a, s in zip(t["accuracy"][m], t["sets"]) if s["eps"] == eps and s["surrogate"] == name]
                    assert t["all"][m][k] <= by[m][k] <= min(own_sets)
        assert t["all"][-1][1] <= t["all"][-1][0]  # a larger ε never leaves more images for the mixture here
    clean = accuracy(targets[0], x, y)
    # white-box on the source's mixture, weaker on the held-out target, weaker still than clean
    assert own["all"][-1][1] < table["all"][0][1] < clean
    mi = momentum_pgd(targets[0], x, y, EPS, EPS / 5, 5, 1.0, True, stream(SEED, "mi"))
    assert accuracy(targets[0], mi, y) < clean


def test_epsilon_sweep_starts_at_clean_accuracy_and_falls(ensemble):
    models, data = ensemble
    x, y = data.x_test[:100], data.y_test[:100]
    sweep = epsilon_sweep(models, x, y, EvalConfig(transfer=FAST), SEED)
    assert sweep["models"] == ["sub0", "sub1", "sub2", "mixture"] and sweep["eps"] == FAST.sweep_eps
    for name, row in zip(sweep["models"], sweep["worst_case"]):
        model = Mixture(models) if name == "mixture" else models[int(name[3:])]
        assert row[0] == pytest.approx(accuracy(model, x, y))  # ε = 0 changes nothing
        assert row[0] > row[1] > row[2]


def test_transfer_config_is_checked():
    check_section(TransferConfig(), "eval.transfer.")
    with pytest.raises(ConfigError, match=r"eval\.transfer\.eps=1\.5 must be in \[0, 1\]"):
        check_section(TransferConfig(eps=1.5), "eval.transfer.")
    with pytest.raises(ConfigError, match=r"eval\.transfer\.sweep_eps=\[\] must list at least one value"):
        check_section(TransferConfig(sweep_eps=[]), "eval.transfer.")


# ----------------------------------------------------------------------------- the whole evaluation


def is_png(path: Path) -> bool:
    from matplotlib.image import imread

    return path.read_bytes()[:8] == PNG_SIGNATURE and imread(path).ndim == 3


def test_full_evaluation_writes_results_plots_and_caches_surrogates(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla,dverge]"]) == 0
    cfg = load_config(run_dir / "config.yaml")
    cfg_small = TransferConfig(**{**vars(FAST), "num_images": 40, "sweep_eps": [0.0, EPS]})
    cfg.eval.full_attacks = ["clean", "pgd_linf", "pgd_linf_margin", "autoattack", "adaptive"]
    cfg.eval.mixture_only = []  # the quickstart's reduced budget attacks the mixture alone with AutoAttack
    cfg.eval.autoattack = AutoAttackConfig(version="custom", attacks=["apgd-ce"], norms=["Linf"], iterations=3)
    cfg.eval.adaptive.steps, cfg.eval.checks.long_steps = 3, 6
    cfg.eval.diversity.num_images, cfg.eval.diversity.steps = 20, 2
    results = full_evaluation(run_dir, cfg, None, torch.device("cpu"), cfg_small, train_in_process)

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["transfer"] == results["transfer"] and set(saved["transfer"]) == {"vanilla", "dverge"}
    for stage in ("vanilla", "dverge"):
        rows = {(r["model"], r["attack"], r["norm"]) for r in saved["eval"] if r["stage"] == stage and r["table"] == "eval"}
        per_model = {("clean", None), ("pgd_linf", "Linf"), ("pgd_linf_margin", "Linf"), ("autoattack", "Linf"),
                     ("worst_case", "Linf")}
        assert rows == {(m, a, n) for m in ("sub0", "sub1", "sub2", "mixture") for a, n in per_model} | {
            ("mixture", "adaptive", "Linf")}
        checks = saved["checks"][stage]  # unbounded ε, more steps, white vs black box; AutoAttack ≤ PGD per model
        assert len(checks) == 3 + 4 and all(line.startswith(("pass: ", "warn: ")) for line in checks)
        assert saved["blackbox"][stage]["models"] == ["sub0", "sub1", "sub2", "mixture"]
        assert saved["blackbox"][stage]["eps"] == [0.0, EPS] and len(saved["blackbox"][stage]["sets"]) == 8
        assert saved["eps_sweep"][stage]["eps"] == [0.0, EPS]
        # The ε sweep counts the black-box images, so the masking check compares the two per ε.
        assert saved["eps_sweep"][stage]["images"] == saved["blackbox"][stage]["images"] is not None
        assert any(line.startswith(("pass: white-box worst case ≤", "warn: white-box worst case above"))
                   for line in checks)
    assert saved["stages"]["dverge"]["epochs"] == 1  # the training record is kept
    md = (run_dir / "results.md").read_text()
    for section in ("### dverge", "AutoAttack L∞", "Adaptive L∞", "**Worst case** L∞", "- pass: ",
                    "## Transferability: dverge", "## Black-box transfer", "### Black-box transfer at ε=0.1",
                    "ens2 momentum PGD CW", "SGM does not apply to conv", "## Accuracy vs ε: vanilla",
                    "The mixture per surrogate ensemble", "| dverge | ens2 | ",
                    "## Vulnerability diversity: dverge"):
        assert section in md
    links = [line[line.index("(") + 1 : -1] for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 5 + 2 and all(is_png(run_dir / link) for link in links)  # + 2 diversity heat maps
    assert saved["diversity"]["dverge"]["n_images"] == 20
    assert all(link.startswith("plots/") for link in links)

    # Surrogates and example sets are cached beside the run: a second evaluation trains and crafts nothing.
    cache = tmp_path / "transfer_cache"
    assert len(list(cache.glob("surrogates/digits-*/ens2-conv-*/checkpoints/vanilla/*"))) >= 1
    stored = sorted(cache.glob("examples/digits-*/ens2-conv-*/*.safetensors"))
    assert len(stored) == 2 * 2 * 2 and all(p.with_suffix(".json").is_file() for p in stored)
    mtimes = [p.stat().st_mtime_ns for p in stored]

    def again(*args):
        pytest.fail("surrogates were trained again")

    monkeypatch.setattr(blackbox, "craft", lambda *a, **k: pytest.fail("examples were crafted again"))
    data = load_dataset(cfg.data)
    sets, y, info = blackbox.prepare_blackbox(run_dir, cfg, cfg_small, data, torch.device("cpu"), again)
    assert len(sets) == 8 and [p.stat().st_mtime_ns for p in stored] == mtimes
    assert info["notes"] and "SGM does not apply to conv" in info["notes"][0]
    again_table = blackbox_table(load_stage_models(run_dir, cfg, data), sets, y, 50, info["images"])
    assert again_table | {"protocol": info} == results["blackbox"]["dverge"]  # the protocol is stored with the table


def load_stage_models(run_dir, cfg, data):
    from dvtrain.eval.load import load_stage

    return load_stage(run_dir, cfg, data, "dverge", torch.device("cpu"))


def test_full_evaluation_refuses_an_unfinished_stage(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]"]) == 0
    cfg = load_config(run_dir / "config.yaml")
    with pytest.raises(DvtrainError, match="stage dverge has no finished checkpoint"):
        full_evaluation(run_dir, cfg, ["dverge"], torch.device("cpu"), FAST, train_in_process)
