"""GroupedEngine against the reference LoopEngine.

Distillation takes sign steps, so a rounding-level difference in a gradient element that is near
zero moves that pixel by a whole step. Grouped and per-model convolutions round differently in
float32, so exact agreement is checked in float64, where both engines give the same digits; float32
is checked for agreement on all but a tiny share of pixels.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dvtrain.config import ComputeConfig, DvergeConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.train import engines
from dvtrain.train.dverge import dverge_step
from dvtrain.train.engines import GroupedEngine, LoopEngine, UnsupportedModelError, make_engine
from dvtrain.train.optim import build_owned
from dvtrain.models import ConvNet, LayeredNet, build_model
from dvtrain.distributed.placement import LocalPlacement

from conftest import REPO

TOL = 1e-5
SIZE = 3
BATCH = 6
CIFAR = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _models(arch: str, dtype: torch.dtype) -> list[LayeredNet]:
    torch.manual_seed(0)
    return [build_model(arch, 3, 32, 10, (0.5,) * 3, (0.25,) * 3).to(dtype) for _ in range(SIZE)]


def _images(dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.rand((BATCH, *CIFAR), generator=torch.Generator().manual_seed(seed)).to(dtype)


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + k) for k in range(SIZE)]


def _assert_same_state(a: list[nn.Module], b: list[nn.Module]) -> None:
    for model_a, model_b in zip(a, b):
        for (name, ta), tb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
            torch.testing.assert_close(ta, tb, rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_conv_distillation_matches_the_loop_at_every_layer(bn_mode, random_start):
    cfg = DvergeConfig(steps=4, bn_mode=bn_mode, random_start=random_start)
    loop_models = _models("conv", torch.float64)
    grouped_models = [copy.deepcopy(m) for m in loop_models]
    engine = GroupedEngine()
    x, x_s = _images(torch.float64, 1), _images(torch.float64, 2)
    for layer in range(1, ConvNet.num_layers + 1):
        g_loop, g_grouped = _generators(), _generators()
        expected = LoopEngine().distill(loop_models, layer, x, x_s, cfg, g_loop)
        got = engine.distill(grouped_models, layer, x, x_s, cfg, g_grouped)
        assert got.shape == (SIZE, BATCH, *CIFAR)
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
        for a, b in zip(g_loop, g_grouped):  # each model's own stream, consumed alike
            assert torch.equal(a.get_state(), b.get_state())


def test_resnet_distillation_updates_batchnorm_statistics_like_the_loop():
    cfg = DvergeConfig(steps=2, bn_mode="train")
    loop_models = _models("resnet20", torch.float64)
    grouped_models = [copy.deepcopy(m) for m in loop_models]
    x, x_s = _images(torch.float64, 1), _images(torch.float64, 2)
    for layer in (1, 4, 20):
        expected = LoopEngine().distill(loop_models, layer, x, x_s, cfg, _generators())
        got = GroupedEngine().distill(grouped_models, layer, x, x_s, cfg, _generators())
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    _assert_same_state(loop_models, grouped_models)


def test_float32_distillation_differs_from_the_loop_only_in_rare_sign_flips():
    cfg = DvergeConfig(steps=10)
    loop_models = _models("conv", torch.float32)
    grouped_models = [copy.deepcopy(m) for m in loop_models]
    x, x_s = _images(torch.float32, 1), _images(torch.float32, 2)
    for layer in range(1, ConvNet.num_layers + 1):
        expected = LoopEngine().distill(loop_models, layer, x, x_s, cfg, _generators())
        got = GroupedEngine().distill(grouped_models, layer, x, x_s, cfg, _generators())
        differs = (got - expected).abs() > TOL
        assert differs.float().mean() < 0.01, f"layer {layer}: {int(differs.sum())} pixels differ"


@pytest.mark.parametrize("arch", ["conv", "resnet20"])
def test_adversarial_examples_match_the_loop(arch):
    """+AdvT's own-model PGD: every model's examples, its generator, and (ResNet-20, train mode) its
    BatchNorm running statistics as the loop leaves them."""
    cfg = DvergeConfig(adv_steps=3, adv_eps=8 / 255, adv_step_size=2 / 255)
    loop_models = [m.train() for m in _models(arch, torch.float64)]
    grouped_models = [copy.deepcopy(m) for m in loop_models]
    x = _images(torch.float64, 1)
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(4))
    g_loop, g_grouped = _generators(), _generators()
    expected = LoopEngine().adversarial(loop_models, x, y, cfg, g_loop)
    got = GroupedEngine().adversarial(grouped_models, x, y, cfg, g_grouped)
    assert got.shape == (SIZE, BATCH, *CIFAR)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert not torch.equal(got[0], got[1])  # each model attacked on its own
    for a, b in zip(g_loop, g_grouped):
        assert torch.equal(a.get_state(), b.get_state())
    _assert_same_state(loop_models, grouped_models)


@pytest.mark.parametrize("ids", [[0, 1, 2], [1, 2]])
def test_diversity_logits_and_their_gradients_match_the_loop(ids):
    """Each model on the others' distilled batches; also with a share of the ensemble, as a rank owns."""
    loop_models = [m.train() for m in _models("resnet20", torch.float64)]
    loop_models = [loop_models[i] for i in ids]
    grouped_models = [copy.deepcopy(m) for m in loop_models]
    distilled = torch.stack([_images(torch.float64, 10 + j) for j in range(SIZE)])
    others = [[j for j in range(SIZE) if j != i] for i in ids]
    weights = torch.rand(len(ids), SIZE - 1, BATCH, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = LoopEngine().logits_on(loop_models, distilled, others)
    got = GroupedEngine().logits_on(grouped_models, distilled, others)
    assert got.shape == (len(ids), SIZE - 1, BATCH, 10)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    for a, b in zip(loop_models, grouped_models):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=TOL)
    _assert_same_state(loop_models, grouped_models)


def _owned_digits(arch: str, *overrides: str):
    cfg = load_config(None, [
        "data.train_limit=64", f"model.arch={arch}", "dverge.steps=3", "dverge.optim.lr=0.05", *overrides,
    ])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, list(range(SIZE)), "dverge", torch.device("cpu"))
    for model in owned.models.values():
        model.double()  # parameters keep their identity, so the optimizers still hold them
    return cfg, owned, data.x_train.double(), data.y_train


@pytest.mark.parametrize("arch, advt", [("conv", False), ("resnet20", False), ("resnet20", True)])
def test_three_dverge_steps_leave_the_same_weights_and_statistics(arch, advt):
    """With +AdvT also the adversarial examples, the clean term, and the order of BatchNorm updates."""
    runs = []
    extra = ["dverge.plus_adv=true", "dverge.adv_steps=3", "dverge.clean_weight=0.5"] if advt else []
    for engine in (LoopEngine(), GroupedEngine()):
        cfg, owned, x, y = _owned_digits(arch, *extra)
        placement = LocalPlacement(SIZE)
        num_layers = owned.models[0].num_layers
        for step, layer in enumerate((1, num_layers // 2, num_layers)):
            a, b = slice(16 * step, 16 * step + 16), slice(48 - 16 * step, 64 - 16 * step)
            dverge_step(owned, placement, engine, layer, x[a], y[a], x[b], y[b], cfg.dverge)
        runs.append([owned.models[i] for i in owned.ids])
    _assert_same_state(*runs)


def test_config_selects_the_grouped_engine():
    cfg = load_config(None, ["dverge.engine=grouped"])
    assert isinstance(make_engine(cfg.dverge.engine, cfg.compute), GroupedEngine)


def test_a_model_with_an_unsupported_layer_is_refused_with_advice():
    class Odd(LayeredNet):
        num_layers = 1

        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def layers(self, x):
            yield self.norm(x)

    with pytest.raises(UnsupportedModelError, match=r"^engine 'grouped' cannot widen norm \(LayerNorm\); use dverge.engine=loop$"):
        GroupedEngine().distill([Odd(), Odd()], 1, torch.rand(2, 4), torch.rand(2, 4), DvergeConfig(), _generators())
    with pytest.raises(UnsupportedModelError, match=r"^engine 'grouped' cannot widen the model \(LayerNorm\)"):
        GroupedEngine().logits([nn.LayerNorm(4), nn.LayerNorm(4)], torch.rand(2, 3, 4))


@pytest.mark.parametrize("layer, message", [
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), r"supports zero-padded convolutions only \(body\)"),
    (nn.BatchNorm2d(3, momentum=None), r"needs BatchNorm with a momentum and running stats \(body\)"),
    (nn.BatchNorm2d(3, track_running_stats=False), r"needs BatchNorm with a momentum and running stats \(body\)"),
])
def test_layers_the_grouped_engine_would_compute_wrongly_are_refused(layer, message):
    class Net(LayeredNet):
        num_layers = 1

        def __init__(self):
            super().__init__()
            self.body = layer

        def layers(self, x):
            yield self.body(x)

    with pytest.raises(UnsupportedModelError, match=message):
        GroupedEngine().logits([Net(), Net()], torch.rand(2, 2, 3, 4, 4))


def test_quick_bench_prints_its_figures_as_json_last():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # correctness here, not speed: stay off busy cores
    out = subprocess.run(
        [sys.executable, "-m", "dvtrain.tools.bench", "--quick", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report["settings"]) == {"conv_x3_b32", "conv_x3_b128", "resnet20_x3_b128"}
    for figures in report["settings"].values():
        assert set(figures["images_per_s"]) == {"reference", "loop", "grouped"}
        assert all(v > 0 for v in figures["images_per_s"].values())
        assert set(figures["speedup_vs_reference"]) == {"loop", "grouped"}
        assert set(figures["peak_mem_mib"]) == {"reference", "loop", "grouped"}
    assert set(report["projected_hours"]) == {"conv_x3_200ep", "resnet20_x3_200ep"}
    # issue 15: the grouped step dispatches at most a third of the reference's operators and never waits
    ops, syncs = report["ops_per_step"], report["host_syncs_per_step"]
    assert ops["grouped"] <= ops["reference"] / 3 and syncs["grouped"] == 0
    assert min(report["load_average"]["before"]) >= 0


def test_a_linear_layer_without_bias_is_widened_exactly():
    class NoBias(LayeredNet):
        num_layers = 1

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2, bias=False)

        def layers(self, x):
            yield self.fc(x.flatten(1))

    torch.manual_seed(0)
    models = [NoBias().double() for _ in range(SIZE)]
    inputs = torch.rand(SIZE, 5, 1, 2, 2, dtype=torch.float64)
    expected = LoopEngine().logits(models, inputs)
    torch.testing.assert_close(GroupedEngine().logits(models, inputs), expected, rtol=0, atol=1e-12)


def test_grouped_engine_serves_a_process_that_owns_one_submodel():
    cfg = DvergeConfig(adv_steps=2, adv_eps=8 / 255, adv_step_size=2 / 255)
    model = _models("conv", torch.float64)[0].train()
    x = _images(torch.float64, 1)
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(4))
    engine = GroupedEngine()
    torch.testing.assert_close(engine.logits([model], x[None]), LoopEngine().logits([model], x[None]), rtol=0, atol=TOL)
    got = engine.adversarial([model], x, y, cfg, [torch.Generator().manual_seed(1)])
    expected = LoopEngine().adversarial([model], x, y, cfg, [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_the_grouped_engine_compiles_its_wide_network_when_asked(monkeypatch):
    compiled = []
    monkeypatch.setattr(engines, "compile_features", lambda shell: compiled.append(shell))
    models = _models("conv", torch.float32)
    for flag in (False, True):
        shell = make_engine("grouped", ComputeConfig(compile=flag))._prepare(models)
        assert compiled == ([shell] if flag else [])
    assert isinstance(make_engine("grouped"), GroupedEngine) and len(compiled) == 1
