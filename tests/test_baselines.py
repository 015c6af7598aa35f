"""ADP, GAL and TRS: each regulariser against a direct computation, and the per-process decomposition."""

import math

import pytest
import torch
from torch import nn

from dvtrain.train import baselines
from dvtrain.config import load_config
from dvtrain.data import load_dataset
from dvtrain.train.optim import build_owned
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.timing import DISABLED
from dvtrain.stages import spec
from dvtrain.train.frame import update
from dvtrain.train.stage import StageRun


def _linear_models(count: int, dim: int = 4, classes: int = 3, seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(dim, classes).double() for _ in range(count)]


def _batch(rows: int = 5, dim: int = 4, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (rows,), generator=g)


def _hand_input_gradient(model: nn.Linear, x, y, batch: int) -> list[list[float]]:
    """∇_x of the batch's mean CE for a linear model, row by row: Wᵀ(softmax(Wx + b) − e_y) / batch."""
    W, b = model.weight.tolist(), model.bias.tolist()
    grads = []
    for row, label in zip(x.tolist(), y.tolist()):
        z = [sum(w * v for w, v in zip(W[k], row)) + b[k] for k in range(len(b))]
        e = [math.exp(v - max(z)) for v in z]
        p = [v / sum(e) for v in e]
        delta = [p[k] - (k == label) for k in range(len(b))]
        grads.append([sum(W[k][d] * delta[k] for k in range(len(b))) / batch for d in range(len(row))])
    return grads


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(u * v for u, v in zip(a, b))
    return dot / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))


def test_adp_terms_match_a_hand_computation():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
                          [[0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]], dtype=torch.float64)  # [M=2, B=2, K=3]
    y = torch.tensor([0, 2])
    jitter = 1e-6
    entropies, log_dets = [], []
    for b, label in enumerate(y.tolist()):
        mean = [(probs[0, b, k] + probs[1, b, k]).item() / 2 for k in range(3)]
        entropies.append(-sum(p * math.log(p) for p in mean))
        # non-true-class predictions, normalised; the 2×2 Gram matrix is [[1, c], [c, 1]]
        u, v = ([probs[m, b, k].item() for k in range(3) if k != label] for m in range(2))
        c = _cos(u, v)
        log_dets.append(math.log((1 + jitter) ** 2 - c * c))
    assert baselines.ensemble_entropy(probs, 0.0).item() == pytest.approx(sum(entropies) / 2, rel=1e-12)
    assert baselines.non_true_log_det(probs, y, jitter).item() == pytest.approx(sum(log_dets) / 2, rel=1e-9)
    # identical submodels make the Gram matrix singular: only the jitter keeps the log finite and very negative
    same = probs[:1].expand(2, -1, -1)
    assert baselines.non_true_log_det(same, y, jitter).item() < math.log(1e-5)


def test_input_gradients_and_gradient_regularisers_match_a_hand_computation():
    models = _linear_models(3)
    x, y = _batch()
    x = x.requires_grad_(True)
    grads = torch.stack([baselines.input_gradient(m, x, y, len(y))[1] for m in models])
    hand = [_hand_input_gradient(m, x.detach(), y, len(y)) for m in models]
    torch.testing.assert_close(grads, torch.tensor(hand, dtype=torch.float64))
    pairs = [(0, 1), (0, 2), (1, 2)]
    coherence = sum(math.log(sum(math.exp(_cos(hand[i][b], hand[j][b])) for i, j in pairs)) for b in range(5)) / 5
    cosine = sum(abs(_cos(hand[i][b], hand[j][b])) for i, j in pairs for b in range(5)) / 15
    smooth = [sum(2 * sum(v * v for v in hand[m][b]) for b in range(5)) / 5 for m in range(3)]
    assert baselines.gal_coherence(grads, 0.0).item() == pytest.approx(coherence, rel=1e-12)
    assert baselines.trs_cosine(grads).item() == pytest.approx(cosine, rel=1e-12)
    assert baselines.trs_smoothness(grads).tolist() == pytest.approx(smooth, rel=1e-12)


def test_regulariser_gradients_reach_the_weights_through_the_input_gradient():
    """Double backpropagation: the GAL term's weight gradient equals a finite difference of the term."""
    models = _linear_models(3)
    x, y = _batch()

    def coherence() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        return baselines.gal_coherence(torch.stack([baselines.input_gradient(m, xg, y, len(y))[1] for m in models]), 0.0)

    (analytic,) = torch.autograd.grad(coherence(), [models[1].weight])
    h = 1e-6
    with torch.no_grad():
        models[1].weight[2, 1] += h
    up = coherence().item()
    with torch.no_grad():
        models[1].weight[2, 1] -= 2 * h
    down = coherence().item()
    assert analytic[2, 1].item() == pytest.approx((up - down) / (2 * h), rel=1e-5)
    assert analytic.abs().sum() > 0


class OneRank(LocalPlacement):
    """A process that owns `owned` of `size` submodels; its all-gathers return what the whole ensemble
    produced (recorded from a one-process run), after checking that its own rows are what it sends."""

    def __init__(self, size: int, owned: list[int], recorded: list[torch.Tensor]):
        super().__init__(size)
        self.owned, self.recorded = owned, list(recorded)

    def all_gather(self, owned_values):
        every = self.recorded.pop(0)
        torch.testing.assert_close(owned_values, every[self.owned], rtol=0, atol=0)
        return every.clone()


class Recording(LocalPlacement):
    def __init__(self, size: int):
        super().__init__(size)
        self.recorded = []

    def all_gather(self, owned_values):
        self.recorded.append(owned_values.detach().clone())
        return owned_values


LOSSES = {"adp": baselines.adp_loss, "gal": baselines.gal_loss, "trs": baselines.trs_loss}


@pytest.mark.parametrize("stage", ["adp", "gal", "trs"])
def test_rank_local_loss_gives_each_owned_submodel_the_full_loss_gradient(stage):
    models = _linear_models(3, classes=4)
    x, y = _batch(rows=6, classes=4)
    cfg = getattr(load_config(None, ["trs.pgd_steps=2"]), stage)
    extra = {"start": torch.rand_like(x) * 2 - 1, "split": 3, "eps": 0.1} if stage == "trs" else {}

    def gradients(placement, owned):
        for m in models:
            m.zero_grad()
        loss = LOSSES[stage]([models[i] for i in owned], placement, x, y, len(y), cfg, **extra).loss
        loss.backward()
        return [p.grad.clone() for i in owned for p in models[i].parameters()]

    recording = Recording(3)
    full = gradients(recording, [0, 1, 2])
    assert all(g.abs().sum() > 0 for g in full)
    per_param = len(list(models[0].parameters()))
    for owned in ([0], [1, 2], [2]):
        local = gradients(OneRank(3, owned, recording.recorded), owned)
        expected = [g for i in owned for g in full[i * per_param : (i + 1) * per_param]]
        for a, b in zip(local, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_trs_smoothness_pgd_raises_the_gradient_norm_inside_the_ball():
    models = _linear_models(3)
    x, y = _batch(rows=8)
    cfg = load_config(None, ["trs.pgd_steps=4"]).trs
    start = torch.zeros_like(x)
    moved = baselines.smoothness_pgd(models, LocalPlacement(3), x, y, start, 0.2, cfg)
    assert (moved - x).abs().max() <= 0.2 + 1e-12 and moved.min() >= 0 and moved.max() <= 1

    def norm(points):
        points = points.clone().requires_grad_(True)
        return baselines.trs_smoothness(torch.stack([baselines.input_gradient(m, points, y, len(y))[1] for m in models])).sum()

    assert norm(moved) > norm(x)


def test_trs_eps_grows_linearly_over_the_epochs():
    cfg = load_config(None, ["trs.epochs=4", "trs.init_eps=0.1", "trs.adv_eps=0.3"]).trs
    assert [baselines.trs_eps(cfg, e) for e in range(4)] == pytest.approx([0.1, 0.15, 0.2, 0.25])


@pytest.mark.parametrize("stage, ensemble_terms, per_submodel", [
    ("adp", {"loss/entropy", "loss/log_det"}, set()),
    ("gal", {"loss/coherence"}, set()),
    ("trs", {"loss/cosine"}, {"loss/smoothness"}),
])
def test_step_updates_every_submodel_and_reports_its_terms(stage, ensemble_terms, per_submodel):
    cfg = load_config(None, ["data.train_limit=64", "trs.pgd_steps=1"])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], stage, torch.device("cpu"))
    before = [owned.models[i].conv1.weight.detach().clone() for i in range(3)]
    x, y = data.x_train[:16], data.y_train[:16]
    placement = LocalPlacement(3)
    run = StageRun(stage, cfg, owned, placement, placement.replicas, data, torch.Generator(), DISABLED)
    trainer = spec(stage).trainer_class()(run)
    batch = trainer.batch(x, y, torch.Generator().manual_seed(0), 0)
    batch.full_rows = len(y)
    figures = update(owned, placement, trainer.step(batch))
    assert set(figures.per_submodel) == {"loss/clean"} | per_submodel and set(figures.ensemble) == ensemble_terms
    assert figures.per_submodel["loss/clean"].shape == (3,) and all(figures.ensemble[k].ndim == 0 for k in ensemble_terms)
    assert figures.clean_logits.shape == (3, 16, 10) and torch.equal(figures.y, y)
    assert all(torch.isfinite(v).all() for v in [*figures.per_submodel.values(), *figures.ensemble.values()])
    assert all(not owned.models[i].conv1.weight.equal(before[i]) for i in range(3))
    assert all(isinstance(owned.optimizers[i], torch.optim.Adam) for i in range(3))


def test_trs_smoothness_pgd_leaves_a_pixel_no_submodel_reads_at_its_start():
    """A zero ascent direction (sign 0) does not move the point."""
    models = _linear_models(3)
    with torch.no_grad():
        for model in models:
            model.weight[:, 0] = 0
    x, y = _batch(rows=8)
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype) * 2 - 1
    moved = baselines.smoothness_pgd(models, LocalPlacement(3), x, y, start, 0.2, load_config(None, ["trs.pgd_steps=3"]).trs)
    first = (x + 0.2 * start).clamp(0, 1)
    assert torch.equal(moved[:, 0], first[:, 0]) and not torch.equal(moved[:, 1:], first[:, 1:])
