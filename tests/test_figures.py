"""Logged and reported figures against a direct computation on the same weights and batch: the per-step
mixture loss and accuracy, the per-epoch test metrics, and the results table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dvtrain.config import EvalConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.mixture import Mixture, mixture_log_probs
from dvtrain.models import build_model
from dvtrain.train.loop import NonFiniteLoss, StepLog, test_metrics as epoch_test_metrics
from dvtrain.train.dverge import dverge_step
from dvtrain.train.engines import LoopEngine
from dvtrain.train.optim import build_owned
from dvtrain.train.stage import StepFigures
from dvtrain.attacks import fgsm, pgd_l2, pgd_linf
from dvtrain.eval.report import results_markdown
from dvtrain.eval.whitebox import cells as table_cells, chunk_generator, evaluate_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixture_by_hand(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss −log((1/M) Σ_i softmax(f_i(x))_y) and accuracy (%) of the mean prediction, image by image."""
    losses, hits = [], []
    for b in range(len(y)):
        probs = [[math.exp(v) for v in row] for row in logits[:, b].tolist()]
        probs = [[v / sum(row) for v in row] for row in probs]
        mean = [sum(p[k] for p in probs) / len(probs) for k in range(len(probs[0]))]
        losses.append(-math.log(mean[int(y[b])]))
        hits.append(100.0 if max(range(len(mean)), key=mean.__getitem__) == int(y[b]) else 0.0)
    return sum(losses) / len(y), sum(hits) / len(y)


def test_mixture_log_probs_is_the_log_of_the_mean_softmax():
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    expected = torch.log(torch.softmax(logits, dim=-1).mean(dim=0))
    torch.testing.assert_close(mixture_log_probs(logits), expected, rtol=1e-12, atol=1e-12)
    huge = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]], dtype=torch.float64)  # stable for any logit scale
    torch.testing.assert_close(mixture_log_probs(huge), torch.tensor([[math.log(0.5)] * 2], dtype=torch.float64))
    models = [torch.nn.Linear(4, 3).double() for _ in range(3)]
    x = torch.rand(6, 4, dtype=torch.float64)
    mixture = Mixture(models)
    torch.testing.assert_close(mixture(x), mixture_log_probs(torch.stack([m(x) for m in models])))
    torch.testing.assert_close(mixture.mean_probs(x), torch.stack([m(x).softmax(-1) for m in models]).mean(0))


def test_step_log_reports_each_steps_mixture_and_submodel_figures():
    g = torch.Generator().manual_seed(1)
    steps = []
    for batch in (5, 3):  # batches of different sizes are each their own step
        logits = torch.randn(3, batch, 4, generator=g, dtype=torch.float64) * 2
        y = torch.randint(0, 4, (batch,), generator=g)
        per_submodel = {"loss/dverge": torch.rand(3, generator=g, dtype=torch.float64),
                        "loss/clean": torch.rand(3, generator=g, dtype=torch.float64)}
        steps.append(StepFigures(per_submodel, logits, y, ensemble={"loss/cosine": torch.tensor(0.25 * batch)}))
    log = StepLog(LocalPlacement(3), "dverge", 0)
    for k, figures in enumerate(steps, start=1):
        log.add(k * 10, figures)
    rows = log.flush()
    assert [step for step, _ in rows] == [10, 20] and log.flush() == []
    for (_, row), figures in zip(rows, steps):
        loss, acc = _mixture_by_hand(figures.clean_logits, figures.y)
        assert row["train/loss/mixture"] == pytest.approx(loss, rel=1e-9)
        assert row["train/acc/mixture"] == pytest.approx(acc, rel=1e-12)
        assert row["train/loss/cosine"] == float(figures.ensemble["loss/cosine"])
        for name, values in figures.per_submodel.items():
            assert [row[f"train/{name}/sub{i}"] for i in range(3)] == pytest.approx(values.tolist(), rel=1e-12)
        assert len(row) == 2 * 3 + 3


def test_step_log_names_a_non_finite_figure():
    logits = torch.zeros(3, 2, 4)
    figures = StepFigures({"loss/dverge": torch.tensor([0.1, float("nan"), 0.2])}, logits, torch.tensor([0, 1]), {})
    log = StepLog(LocalPlacement(3), "dverge", 2)
    log.add(4, figures)
    with pytest.raises(NonFiniteLoss, match="loss/dverge of submodel 1 is not finite at dverge epoch 3 step 4"):
        log.flush()


def test_epoch_test_metrics_equal_a_direct_computation():
    cfg = load_config(None, ["data.train_limit=64", "data.test_limit=23", "model.arch=resnet20"])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], "dverge", torch.device("cpu"))
    for model in owned.models.values():
        model.train()  # the metrics are taken in eval mode and the mode handed back
    metrics = epoch_test_metrics(owned, LocalPlacement(3), data, batch_size=7)
    assert all(owned.models[i].training for i in owned.ids)
    with torch.no_grad():
        for model in owned.models.values():
            model.eval()
        logits = torch.stack([owned.models[i](data.x_test) for i in owned.ids]).double()
    for i in owned.ids:
        hits = sum(int(logits[i, b].argmax()) == int(data.y_test[b]) for b in range(len(data.y_test)))
        assert metrics[f"test/acc/sub{i}"] == pytest.approx(100 * hits / len(data.y_test), abs=1e-4)
    loss, acc = _mixture_by_hand(logits, data.y_test)
    assert metrics["test/loss/mixture"] == pytest.approx(loss, rel=1e-5)
    assert metrics["test/acc/mixture"] == pytest.approx(acc, abs=1e-4)
    assert set(metrics) == {"test/acc/sub0", "test/acc/sub1", "test/acc/sub2", "test/acc/mixture", "test/loss/mixture"}


# ----------------------------------------------------------------------------- the results table


def _trained_models(data, count=2, steps=60):
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model("conv", 1, 8, 10, mean=(0.5,), std=(0.25,))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train), data.y_train).backward()
            optimizer.step()
        models.append(model)
    return models


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * int((model(x).argmax(1) == y).sum()) / len(y)


def _hand_attack(model, x, y, attack, cfg: EvalConfig, generator) -> torch.Tensor:
    """Each attack written out: FGSM, L∞ PGD and L2 PGD from their random starts."""
    def grad(z):
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(z), y), z)[0]

    if attack == "clean":
        return x
    if attack == "fgsm":
        return (x + cfg.eps * grad(x).sign()).clamp(0, 1)
    if attack == "pgd_linf":
        adv = (x + (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1) * cfg.eps).clamp(0, 1)
        for _ in range(cfg.steps):
            adv = (adv + cfg.step_size * grad(adv).sign()).clamp(x - cfg.eps, x + cfg.eps).clamp(0, 1)
        return adv
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = torch.rand(len(x), generator=generator, dtype=x.dtype) * cfg.l2_eps
    adv = (x + direction * radius.view(-1, 1, 1, 1)).clamp(0, 1)
    for _ in range(cfg.steps):
        g = grad(adv)
        adv = adv + cfg.l2_step_size * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = adv - x
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        adv = (x + delta * torch.clamp(cfg.l2_eps / norm, max=1.0)).clamp(0, 1)
    return adv


ATTACKS = ("clean", "fgsm", "pgd_linf", "pgd_l2")


class IgnoresAPixel(torch.nn.Module):
    """A linear classifier of 8×8 images that does not read pixel (0, 0): its input gradient there is 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(64, 10)
        with torch.no_grad():
            self.linear.weight[:, 0] = 0

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("attack", ["fgsm", "pgd_linf", "pgd_l2"])
@pytest.mark.parametrize("steps", [0, 2])
def test_attacks_equal_their_written_out_steps(attack, steps):
    """The attacked images themselves (the table only counts them): a pixel with zero gradient stays, the
    random starts stay inside [0, 1]."""
    model = IgnoresAPixel()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g) * (torch.rand(6, 1, 8, 8, generator=g) > 0.5)  # many pixels at 0
    y = torch.randint(0, 10, (6,), generator=g)
    cfg = EvalConfig(eps=0.1, steps=steps, step_size=0.04, l2_eps=0.5, l2_step_size=0.2, random_start=True)
    g = torch.Generator().manual_seed(2)
    got = {"fgsm": lambda: fgsm(model, x, y, cfg.eps),
           "pgd_linf": lambda: pgd_linf(model, x, y, cfg.eps, cfg.step_size, steps, True, g),
           "pgd_l2": lambda: pgd_l2(model, x, y, cfg.l2_eps, cfg.l2_step_size, steps, True, g)}[attack]()
    expected = _hand_attack(model, x, y, attack, cfg, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    if attack == "fgsm" or steps == 0:
        assert torch.equal(got[:, :, 0, 0], (x if attack == "fgsm" else expected)[:, :, 0, 0])


def test_results_table_equals_a_direct_computation_of_every_cell():
    """Every (model, attack) cell, restarts and batches included, and the markdown table shows them."""
    cfg = load_config(None, ["data.train_limit=300", "data.test_limit=30"])
    data = load_dataset(cfg.data)
    models = _trained_models(data)
    x, y = data.x_test, data.y_test
    eval_cfg = EvalConfig(eps=0.1, steps=3, step_size=0.04, l2_eps=0.5, l2_step_size=0.2, random_start=True,
                          restarts=2, num_examples=25, batch_size=10)
    rows = evaluate_stage("dverge", models, x, y, eval_cfg, seed=3, attacks=list(ATTACKS))
    x, y = x[:25], y[:25]
    named = {"sub0": models[0], "sub1": models[1], "mixture": Mixture(models)}
    table, masks = {}, {}
    for name, model in named.items():
        for attack in ATTACKS:
            generator = chunk_generator(3, name, table_cells([attack], eval_cfg)[0], 0, 0)  # 25 images: one chunk
            robust = torch.ones(len(y), dtype=torch.bool)
            for _ in range(eval_cfg.restarts if attack in ("pgd_linf", "pgd_l2") else 1):
                for start in range(0, len(y), eval_cfg.batch_size):
                    xb, yb = x[start:start + eval_cfg.batch_size], y[start:start + eval_cfg.batch_size]
                    adv = _hand_attack(model, xb, yb, attack, eval_cfg, generator)
                    with torch.no_grad():
                        robust[start:start + eval_cfg.batch_size] &= model(adv).argmax(1) == yb
            masks[(name, attack)] = robust
            table[(name, attack)] = 100.0 * int(robust.sum()) / len(y)
    got = {(r["model"], r["attack"]): r["accuracy"] for r in rows if r["attack"] != "worst_case"}
    assert got == pytest.approx(table, abs=1e-9)
    # the worst case per norm: images correct when clean and under every attack of that norm
    worst = {(name, norm): 100.0 * int((masks[(name, "clean")] & torch.stack([masks[(name, a)] for a in of]).all(0)).sum())
             / len(y) for name in named for norm, of in (("Linf", ("fgsm", "pgd_linf")), ("L2", ("pgd_l2",)))}
    assert {(r["model"], r["norm"]): r["accuracy"] for r in rows if r["attack"] == "worst_case"} == pytest.approx(worst)
    assert all(r["n"] == 25 for r in rows)
    assert table[("mixture", "clean")] == _accuracy(named["mixture"], x, y) > 50  # trained models: the
    assert table[("mixture", "pgd_linf")] < table[("mixture", "clean")]  # cells are not all alike
    markdown = results_markdown(rows)
    for name, label in (("sub0", "Submodel 1"), ("sub1", "Submodel 2"), ("mixture", "Mixture")):
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
        cells = [cell.split(" [")[0] for cell in line.strip("| ").split(" | ")[1:]]  # value before its interval
        shown = [f"{table[(name, 'clean')]:.2f}", f"{worst[(name, 'Linf')]:.2f}", f"{worst[(name, 'L2')]:.2f}",
                 *(f"{table[(name, a)]:.2f}" for a in ATTACKS[1:])]
        assert cells == shown


def test_a_dverge_steps_logged_mixture_is_that_of_the_pre_update_submodels_on_its_clean_batch():
    cfg = load_config(None, ["data.train_limit=64", "dverge.steps=1"])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], "dverge", torch.device("cpu"))
    x, y, x_s, y_s = data.x_train[:16], data.y_train[:16], data.x_train[16:32], data.y_train[16:32]
    with torch.no_grad():
        logits = torch.stack([owned.models[i](x) for i in owned.ids]).double()
    figures = dverge_step(owned, LocalPlacement(3), LoopEngine(), 2, x, y, x_s, y_s, cfg.dverge)
    log = StepLog(LocalPlacement(3), "dverge", 0)
    log.add(1, figures)
    [(step, row)] = log.flush()
    loss, acc = _mixture_by_hand(logits, y)
    assert step == 1 and row["train/loss/mixture"] == pytest.approx(loss, rel=1e-5)
    assert row["train/acc/mixture"] == pytest.approx(acc, abs=1e-4)
    assert set(row) == {f"train/{n}/sub{i}" for n in ("loss/dverge", "loss/clean") for i in range(3)} | {
        "train/loss/mixture", "train/acc/mixture"}


def test_a_mixture_of_a_processs_submodels_gathers_the_others_outputs():
    """With a placement, the mixture averages every submodel's prediction, the others' brought in by it."""
    models = [torch.nn.Linear(4, 3).double() for _ in range(3)]
    x = torch.rand(5, 4, dtype=torch.float64)

    class OwnsLast(LocalPlacement):
        def gather_outputs(self, owned_values):
            return torch.cat([torch.stack([m(x) for m in models[:2]]), owned_values])

    torch.testing.assert_close(Mixture(models[2:], OwnsLast(3))(x), Mixture(models)(x), rtol=1e-12, atol=1e-12)
