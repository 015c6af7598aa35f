"""Invariants of the DVERGE step (Algorithm 1)."""

import torch
import torch.nn.functional as F

from dvtrain.config import load_config
from dvtrain.data import load_dataset
from dvtrain.distill import distill
from dvtrain.train.dverge import dverge_step
from dvtrain.train.engines import LoopEngine
from dvtrain.train.optim import build_owned
from dvtrain.distributed.placement import LocalPlacement


def _setup(*overrides):
    cfg = load_config(None, ["data.train_limit=64", *overrides])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, [0, 1, 2], "dverge", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    idx, idx_s = torch.randperm(64, generator=g)[:16], torch.randperm(64, generator=g)[:16]
    return cfg, owned, data.x_train[idx], data.y_train[idx], data.x_train[idx_s], data.y_train[idx_s]


def test_step_matches_a_direct_computation_of_the_loss():
    cfg, owned, x, y, x_s, y_s = _setup("dverge.steps=3", "dverge.optim.momentum=0.0", "dverge.optim.weight_decay=0.0")
    d = cfg.dverge
    before = {i: {k: v.clone() for k, v in owned.models[i].state_dict().items()} for i in owned.ids}
    gens = {i: owned.generators[i].get_state() for i in owned.ids}
    layer = 2
    distilled = [distill(owned.models[i], layer, x, x_s, d, owned.generators[i]) for i in owned.ids]
    for i in owned.ids:  # rewind so dverge_step sees the same state
        owned.models[i].load_state_dict(before[i])
        owned.generators[i].set_state(gens[i])
    expected = {}
    for i in owned.ids:
        model = owned.models[i]
        loss = sum(F.cross_entropy(model(distilled[j]), y_s) for j in owned.ids if j != i)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected[i] = [p.detach() - d.optim.lr * g for p, g in zip(model.parameters(), grads)]
        expected[i + 10] = float(loss.detach())
    figures = dverge_step(owned, LocalPlacement(3), LoopEngine(), layer, x, y, x_s, y_s, d)
    for i in owned.ids:
        for p, e in zip(owned.models[i].parameters(), expected[i]):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
        assert abs(float(figures.per_submodel["loss/dverge"][i]) - expected[i + 10]) < 1e-4
    assert figures.per_submodel["loss/dverge"].shape == (3,) and figures.per_submodel["loss/clean"].shape == (3,)
    assert figures.clean_logits.shape == (3, len(y), 10) and torch.equal(figures.y, y)


def test_own_distilled_batch_gives_no_gradient():
    """Changing submodel i's own distilled batch leaves submodel i's update unchanged."""

    class RecordingPlacement(LocalPlacement):
        def __init__(self, size, replace_index):
            super().__init__(size)
            self.replace_index = replace_index

        def all_gather(self, owned_values):
            if owned_values.ndim == 5:  # the distilled batches: scramble one submodel's
                owned_values = owned_values.clone()
                owned_values[self.replace_index] = torch.rand_like(owned_values[self.replace_index])
            return owned_values

    results = []
    for placement in (LocalPlacement(3), RecordingPlacement(3, replace_index=1)):
        cfg, owned, x, y, x_s, y_s = _setup("dverge.steps=2")
        dverge_step(owned, placement, LoopEngine(), 3, x, y, x_s, y_s, cfg.dverge)
        results.append({i: [p.detach().clone() for p in owned.models[i].parameters()] for i in owned.ids})
    same = [all(torch.equal(a, b) for a, b in zip(results[0][i], results[1][i])) for i in range(3)]
    assert same == [False, True, False]


def test_plus_adv_and_clean_term_change_the_loss():
    base = _setup("dverge.steps=1")
    with_adv = _setup("dverge.steps=1", "dverge.plus_adv=true", "dverge.adv_steps=2")
    m0 = dverge_step(base[1], LocalPlacement(3), LoopEngine(), 1, *base[2:], base[0].dverge).per_submodel
    m1 = dverge_step(with_adv[1], LocalPlacement(3), LoopEngine(), 1, *with_adv[2:], with_adv[0].dverge).per_submodel
    assert "loss/adv" not in m0 and m1["loss/adv"].shape == (3,)
    assert torch.all(m1["loss/adv"] > 0)
    torch.testing.assert_close(m0["loss/dverge"], m1["loss/dverge"])  # same pre-update models and batches
