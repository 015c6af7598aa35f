"""Every term of every stage's objective, checked on the update it makes.

Each test writes the stage's loss out by hand (plain per-model loops, `F.cross_entropy`, the formula of
the paper and reference code quoted in docs/baselines.md and `dvtrain.train.dverge`), takes one hand
SGD step `p - lr * grad` (momentum 0, weight decay 0, float64 submodels) and compares the weights the
stage leaves. Each test also checks that dropping any one term (or flipping its sign) would move the
weights by far more than the tolerance, so a term that never trains or enters with the wrong sign fails.
"""

from __future__ import annotations

import copy
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from dvtrain.config import load_config
from dvtrain.data import load_dataset
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.attacks import pgd_linf
from dvtrain.timing import DISABLED, PhaseTimer
from dvtrain.distill import distill
from dvtrain.train.dverge import dverge_step
from dvtrain.train.engines import GroupedEngine, LoopEngine
from dvtrain.train.optim import build_owned
from dvtrain.stages import spec
from dvtrain.train.frame import update
from dvtrain.train.stage import StageRun

LR = 0.05
PLAIN_SGD = ["optim.name=sgd", f"optim.lr={LR}", "optim.momentum=0.0", "optim.weight_decay=0.0"]
# float64 throughout: the hand computation and the stage sum in other orders, nothing else differs.
RTOL, ATOL = 1e-9, 1e-12
# Each term's share of the update must exceed this (in the largest weight change), so a test that
# passes with the term also fails without it.
MATTERS = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


def _owned(stage: str, *overrides: str):
    cfg = load_config(None, ["data.train_limit=64", *[f"{stage}.{o}" for o in PLAIN_SGD], *overrides])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], stage, torch.device("cpu"))
    for model in owned.models.values():
        model.double()  # parameters keep their identity, so the optimizers still hold them
    return cfg, data, owned


def _sgd_step(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
    return [p.detach() - LR * (g if g is not None else 0) for p, g in zip(model.parameters(), grads)]


def _largest_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def _check_update(owned, expected: dict, ablated: dict) -> None:
    """The weights equal `expected[i]`; every entry of `ablated[term][i]` (the update without that
    term, or with its sign flipped) is far from them."""
    for i in owned.ids:
        got = [p.detach() for p in owned.models[i].parameters()]
        for g, e in zip(got, expected[i]):
            torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)
        for term, updates in ablated.items():
            assert _largest_change(got, updates[i]) > MATTERS, f"submodel {i}: the {term} term does not matter here"


def _mean_ce(model, x, y):
    return F.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------- DVERGE


def _pairs(data, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    idx, idx_s = torch.randperm(64, generator=g)[:batch], torch.randperm(64, generator=g)[:batch]
    x, y = data.x_train.double(), data.y_train
    return x[idx], y[idx], x[idx_s], y[idx_s]


@pytest.mark.parametrize("engine", [LoopEngine, GroupedEngine])
@pytest.mark.parametrize("alpha, beta, plus_adv", [(0.7, 0.3, True), (1.0, 0.0, False), (1.6, 0.0, True)])
def test_dverge_update_is_one_sgd_step_on_the_written_out_loss(engine, alpha, beta, plus_adv):
    """loss_i = α Σ_{j≠i} CE(f_i(x'_j), y_s) + β CE(f_i(x), y) + [CE(f_i(adv_i), y_s)], α and β through
    the config, the +AdvT term from the submodel's own PGD examples; the figures are the unweighted terms."""
    cfg, data, owned = _owned(
        "dverge", f"dverge.diversity_weight={alpha}", f"dverge.clean_weight={beta}", f"dverge.plus_adv={plus_adv}",
        "dverge.steps=2", "dverge.adv_steps=2",
    )
    d = cfg.dverge
    x, y, x_s, y_s = _pairs(data)
    layer = 3
    before = {i: copy.deepcopy(owned.models[i]) for i in owned.ids}
    streams = {i: torch.Generator().set_state(owned.generators[i].get_state()) for i in owned.ids}
    for model in before.values():
        model.train()
    distilled = {i: distill(before[i], layer, x, x_s, d, streams[i]) for i in owned.ids}
    adv = {i: pgd_linf(before[i], x_s, y_s, d.adv_eps, d.adv_step_size, d.adv_steps, True, streams[i])
           for i in owned.ids}

    terms = {}
    for i in owned.ids:
        model = before[i]
        terms[i] = {
            "diversity": sum(_mean_ce(model, distilled[j], y_s) for j in owned.ids if j != i),
            "clean": _mean_ce(model, x, y),
            "adv": _mean_ce(model, adv[i], y_s),
        }
    weights = {"diversity": alpha, "clean": beta, "adv": 1.0 if plus_adv else 0.0}

    def update(changed: str | None = None, factor: float = 1.0) -> dict:
        out = {}
        for i in owned.ids:
            loss = sum(weights[k] * (factor if k == changed else 1.0) * t for k, t in terms[i].items())
            out[i] = _sgd_step(before[i], loss)
        return out

    expected = update()
    ablated = {f"{k} (dropped)": update(k, 0.0) for k, w in weights.items() if w}
    ablated |= {f"{k} (sign)": update(k, -1.0) for k, w in weights.items() if w}
    if alpha != 1.0:
        ablated["diversity (α ignored)"] = update("diversity", 1 / alpha)

    figures = dverge_step(owned, LocalPlacement(3), engine(), layer, x, y, x_s, y_s, d)
    _check_update(owned, expected, ablated)
    f = figures.per_submodel
    assert set(f) == {"loss/dverge", "loss/clean"} | ({"loss/adv"} if plus_adv else set())
    for i in owned.ids:
        assert float(f["loss/dverge"][i]) == pytest.approx(float(terms[i]["diversity"].detach()), rel=1e-9)
        assert float(f["loss/clean"][i]) == pytest.approx(float(terms[i]["clean"].detach()), rel=1e-9)
        if plus_adv:
            assert float(f["loss/adv"][i]) == pytest.approx(float(terms[i]["adv"].detach()), rel=1e-9)
        # the figures' clean logits are the pre-update submodel's, on the clean batch
        with torch.no_grad():
            torch.testing.assert_close(figures.clean_logits[i], before[i](x), rtol=RTOL, atol=ATOL)
    assert torch.equal(figures.y, y)


def test_dverge_generators_feed_the_adversarial_random_start():
    """The +AdvT random start is drawn from each submodel's own stream: one draw of x_s's shape per step."""
    cfg, data, owned = _owned("dverge", "dverge.plus_adv=true", "dverge.steps=1", "dverge.adv_steps=1")
    x, y, x_s, y_s = _pairs(data)
    states = {i: owned.generators[i].get_state() for i in owned.ids}
    dverge_step(owned, LocalPlacement(3), LoopEngine(), 2, x, y, x_s, y_s, cfg.dverge)
    for i in owned.ids:
        replay = torch.Generator().set_state(states[i])
        torch.rand(x_s.shape, generator=replay, dtype=x_s.dtype)
        assert torch.equal(replay.get_state(), owned.generators[i].get_state())


# ----------------------------------------------------------------------------- ADP, GAL, TRS


def _baseline_step(stage: str, cfg, data, owned, x, y, seed: int, epoch: int = 0):
    placement = LocalPlacement(3)
    run = StageRun(stage, cfg, owned, placement, placement.replicas, data, torch.Generator(), DISABLED)
    trainer = spec(stage).trainer_class()(run)
    batch = trainer.batch(x, y, torch.Generator().manual_seed(seed), epoch)
    batch.full_rows = len(y)
    return update(owned, placement, trainer.step(batch))


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos of each row pair, written out: [B, D], [B, D] → [B]."""
    return (a * b).sum(dim=1) / (a.pow(2).sum(dim=1).sqrt() * b.pow(2).sum(dim=1).sqrt())


def _input_gradient(model, x, y):
    """∇_x of the batch-mean CE at x, one row per image, kept differentiable in the weights."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=True)
    return g.flatten(1)


def _baseline_batch(data, batch=12):
    return data.x_train[:batch].double(), data.y_train[:batch]


def test_adp_update_follows_pang_et_al():
    """ADP: Σ_i CE_i − α·H(p̄) − β·mean_b log det(G_b + jitter·I), G_b the Gram matrix of each submodel's
    unit-length non-true-class prediction (Pang et al. 2019; zjysteven/DVERGE train_adp.py)."""
    alpha, beta = 1.5, 0.25
    cfg, data, owned = _owned("adp", f"adp.alpha={alpha}", f"adp.beta={beta}")
    x, y = _baseline_batch(data)
    before = [copy.deepcopy(owned.models[i]).train() for i in owned.ids]
    probs = [F.softmax(m(x), dim=1) for m in before]
    ce = sum(_mean_ce(m, x, y) for m in before)
    mean = sum(probs) / 3
    entropy = -(mean * torch.log(mean + cfg.adp.log_offset)).sum(dim=1).mean()
    log_dets = []
    for b in range(len(y)):
        keep = [k for k in range(10) if k != int(y[b])]
        unit = [p[b, keep] / p[b, keep].pow(2).sum().sqrt() for p in probs]
        gram = torch.stack([torch.stack([u @ v for v in unit]) for u in unit])
        log_dets.append(torch.logdet(gram + cfg.adp.log_det_jitter * torch.eye(3, dtype=gram.dtype)))
    log_det = sum(log_dets) / len(y)

    def update(a=alpha, b=beta):
        loss = ce - a * entropy - b * log_det
        grads = torch.autograd.grad(loss, [p for m in before for p in m.parameters()], retain_graph=True)
        flat = [p.detach() - LR * g for p, g in zip([p for m in before for p in m.parameters()], grads)]
        n = len(list(before[0].parameters()))
        return {i: flat[i * n:(i + 1) * n] for i in range(3)}

    expected = update()
    ablated = {"entropy (sign)": update(a=-alpha), "entropy (dropped)": update(a=0.0),
               "log det (sign)": update(b=-beta), "log det (dropped)": update(b=0.0),
               "α and β swapped": update(a=beta, b=alpha)}
    figures = _baseline_step("adp", cfg, data, owned, x, y, seed=0)
    _check_update(owned, expected, ablated)
    assert float(figures.ensemble["loss/entropy"]) == pytest.approx(float(entropy.detach()), rel=1e-9)
    assert float(figures.ensemble["loss/log_det"]) == pytest.approx(float(log_det.detach()), rel=1e-9)
    for i, m in enumerate(before):
        assert float(figures.per_submodel["loss/clean"][i]) == pytest.approx(float(_mean_ce(m, x, y).detach()), rel=1e-9)


def test_gal_update_follows_kariyappa_and_qureshi():
    """GAL: (1/M) Σ_i CE_i + λ·mean_b log Σ_{i<j} exp(cos(g_i, g_j)), on the batch plus Gaussian noise of
    std `input_noise_std` drawn from the step's noise stream (zjysteven/DVERGE train_gal.py)."""
    lam, std = 0.8, 0.1
    cfg, data, owned = _owned("gal", f"gal.coherence_weight={lam}", f"gal.input_noise_std={std}")
    x, y = _baseline_batch(data)
    before = [copy.deepcopy(owned.models[i]).train() for i in owned.ids]
    noisy = x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    grads = [_input_gradient(m, noisy, y) for m in before]
    coherence = torch.log(sum(torch.exp(_cosines(grads[i], grads[j])) for i, j in combinations(range(3), 2))).mean()
    ce = [_mean_ce(m, noisy, y) for m in before]

    def update(weight=lam, ce_scale=1 / 3):
        loss = ce_scale * sum(ce) + weight * coherence
        params = [p for m in before for p in m.parameters()]
        grads_w = torch.autograd.grad(loss, params, retain_graph=True)
        flat = [p.detach() - LR * g for p, g in zip(params, grads_w)]
        n = len(list(before[0].parameters()))
        return {i: flat[i * n:(i + 1) * n] for i in range(3)}

    expected = update()
    ablated = {"coherence (sign)": update(weight=-lam), "coherence (dropped)": update(weight=0.0),
               "CE summed, not averaged": update(ce_scale=1.0)}
    clean_ce = [float(_mean_ce(m, x, y).detach()) for m in before]
    figures = _baseline_step("gal", cfg, data, owned, x, y, seed=5)
    _check_update(owned, expected, ablated)
    assert float(figures.ensemble["loss/coherence"]) == pytest.approx(float(coherence.detach()), rel=1e-9)
    for i in range(3):  # the figure is the CE the submodel trained on: the noisy batch's
        assert float(figures.per_submodel["loss/clean"][i]) == pytest.approx(float(ce[i].detach()), rel=1e-9)
        assert float(figures.per_submodel["loss/clean"][i]) != pytest.approx(clean_ce[i], rel=1e-6)


def _smoothness_points(models, x, y, start, eps, steps, fraction):
    """TRS's PGD written out: sign ascent on Σ_i ‖∇_x CE_i‖² from x + ε·start, projected on the ε-ball ∩ [0, 1]."""
    adv = (x + eps * start).clamp(0, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        total = 0
        for m in models:
            (g,) = torch.autograd.grad(F.cross_entropy(m(adv), y), adv, create_graph=True)
            total = total + g.pow(2).sum()
        (ascent,) = torch.autograd.grad(total, adv)
        adv = adv.detach() + fraction * eps * ascent.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


@pytest.mark.parametrize("plus_adv", [True, False])
def test_trs_update_follows_yang_et_al(plus_adv):
    """TRS: Σ_i CE_i + scale·(λ_a·mean_{i<j,b} |cos(g_i, g_j)| + λ_b·mean_i 2·mean_b ‖g̃_i‖²); g̃ at the batch
    whose second half a PGD moved to raise the gradient norms, its ε growing with the epoch
    (AI-secure/Transferability-Reduced-Smooth-Ensemble train_trs.py, trainer.py)."""
    lam_a, lam_b, scale, epoch = 1.5, 40.0, 3.0, 1
    cfg, data, owned = _owned(
        "trs", f"trs.lambda_a={lam_a}", f"trs.lambda_b={lam_b}", f"trs.scale={scale}", f"trs.plus_adv={plus_adv}",
        "trs.pgd_steps=2", "trs.epochs=4", "trs.init_eps=0.1", "trs.adv_eps=0.3",
    )
    x, y = _baseline_batch(data, batch=13)  # odd: the first 6 rows stay, the other 7 are moved
    before = [copy.deepcopy(owned.models[i]).train() for i in owned.ids]
    eps = 0.1 + (0.3 - 0.1) * epoch / 4
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
    half = len(y) // 2
    smooth_x = x
    if plus_adv:
        moved = _smoothness_points(before, x[half:], y[half:], start[half:], eps, 2, cfg.trs.pgd_step_fraction)
        assert float((moved - x[half:]).abs().max()) == pytest.approx(eps)  # the PGD reaches the ball's edge
        smooth_x = torch.cat([x[:half], moved])
    grads = [_input_gradient(m, x, y) for m in before]
    cosine = torch.stack([_cosines(grads[i], grads[j]).abs() for i, j in combinations(range(3), 2)]).mean()
    smooth = [2 * _input_gradient(m, smooth_x, y).pow(2).sum(dim=1).mean() for m in before]
    smoothness = sum(smooth) / 3
    ce = sum(_mean_ce(m, x, y) for m in before)

    def update(a=lam_a, b=lam_b, s=scale):
        loss = ce + s * (a * cosine + b * smoothness)
        params = [p for m in before for p in m.parameters()]
        grads_w = torch.autograd.grad(loss, params, retain_graph=True)
        flat = [p.detach() - LR * g for p, g in zip(params, grads_w)]
        n = len(list(before[0].parameters()))
        return {i: flat[i * n:(i + 1) * n] for i in range(3)}

    expected = update()
    ablated = {"cosine (sign)": update(a=-lam_a), "cosine (dropped)": update(a=0.0),
               "smoothness (sign)": update(b=-lam_b), "smoothness (dropped)": update(b=0.0),
               "scale ignored": update(s=1.0)}
    figures = _baseline_step("trs", cfg, data, owned, x, y, seed=7, epoch=epoch)
    _check_update(owned, expected, ablated)
    assert float(figures.ensemble["loss/cosine"]) == pytest.approx(float(cosine.detach()), rel=1e-9)
    assert [float(v) for v in figures.per_submodel["loss/smoothness"]] == pytest.approx(
        [float(v.detach()) for v in smooth], rel=1e-9)


@pytest.mark.parametrize("beta, plus_adv", [(0.0, False), (0.3, False), (0.0, True)])
def test_dverge_training_forwards_update_batchnorm_once_each(beta, plus_adv):
    """ResNet-20 at layer 1 (distillation never reaches the last BatchNorm): the last BatchNorm counts
    one update per training forward — the N−1 diversity batches, the clean batch only when β > 0 (with
    β = 0 it only feeds the figures), and with +AdvT the PGD's adv_steps forwards plus its training one."""
    cfg, data, owned = _owned("dverge", "model.arch=resnet20", f"dverge.clean_weight={beta}",
                              f"dverge.plus_adv={plus_adv}", "dverge.steps=1", "dverge.adv_steps=2")
    x, y, x_s, y_s = _pairs(data, batch=8)
    last_bn = [m for m in owned.models[0].modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    before = int(last_bn.num_batches_tracked)
    timer = PhaseTimer(True, torch.device("cpu"))
    dverge_step(owned, LocalPlacement(3), LoopEngine(), 1, x, y, x_s, y_s, cfg.dverge, timer)
    expected = 2 + (beta > 0) + (3 if plus_adv else 0)
    assert int(last_bn.num_batches_tracked) - before == expected
    assert set(timer.seconds) == {"distill", "all_gather", "train"}
