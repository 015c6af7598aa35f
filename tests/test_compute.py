"""The speed options of `compute`: they change results only as far as their precision does."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from dvtrain import compute
from dvtrain.config import ComputeConfig, ConfigError, load_config
from dvtrain.data import load_dataset
from dvtrain.train.dverge import dverge_step
from dvtrain.train.engines import GroupedEngine, make_engine
from dvtrain.train.optim import build_owned
from dvtrain.models import build_model
from dvtrain.distributed.placement import LocalPlacement

SIZE = 3
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits_step(overrides: list[str]):
    """Submodels after one DVERGE step on 32 digits, and the step's figures."""
    cfg = load_config(None, ["data.train_limit=64", "dverge.steps=5", "dverge.optim.lr=0.05", *overrides])
    data = load_dataset(cfg.data)
    owned = build_owned(cfg, data, list(range(SIZE)), "dverge", CPU)
    x, y = data.x_train, data.y_train
    with compute.autocast(cfg.compute, CPU):
        out = dverge_step(owned, LocalPlacement(SIZE), make_engine(cfg.dverge.engine, cfg.compute), 3,
                          x[:32], y[:32], x[32:], y[32:], cfg.dverge)
    return [owned.models[i] for i in owned.ids], out.per_submodel


def _deltas(models: list[torch.nn.Module], start: list[torch.nn.Module]) -> torch.Tensor:
    return torch.cat([(p - q).flatten() for m, s in zip(models, start) for p, q in zip(m.parameters(), s.parameters())])


def test_bf16_autocast_runs_the_forwards_in_bf16_and_keeps_fp32_weights():
    model = build_model("conv", 1, 8, 10, (0.5,), (0.25,))
    with compute.autocast(ComputeConfig(precision="bf16"), CPU):
        assert model(torch.rand(2, 1, 8, 8)).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with compute.autocast(ComputeConfig(), CPU):
        assert model(torch.rand(2, 1, 8, 8)).dtype == torch.float32


@pytest.mark.parametrize("engine", ["loop", "grouped"])
def test_a_bf16_step_moves_the_weights_like_an_fp32_step(engine):
    start, _ = _digits_step(["dverge.optim.lr=1e-30"])  # the initial weights
    fp32, out32 = _digits_step([f"dverge.engine={engine}"])
    bf16, out16 = _digits_step([f"dverge.engine={engine}", "compute.precision=bf16"])
    torch.testing.assert_close(out16["loss/dverge"], out32["loss/dverge"], rtol=0.03, atol=0)
    d32, d16 = _deltas(fp32, start), _deltas(bf16, start)
    assert d32.norm() > 0
    assert torch.nn.functional.cosine_similarity(d16, d32, dim=0) > 0.95


def test_channels_last_changes_the_layout_not_the_step():
    nchw, out_a = _digits_step(["dverge.engine=grouped"])
    nhwc, out_b = _digits_step(["dverge.engine=grouped", "compute.channels_last=true"])
    conv = next(m for m in nhwc[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_b["loss/dverge"], out_a["loss/dverge"], rtol=1e-4, atol=0)
    for a, b in zip(nchw, nhwc):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-4)


def test_compiled_features_equal_eager_ones():
    torch.manual_seed(0)
    eager = build_model("conv", 3, 16, 10, (0.5,) * 3, (0.25,) * 3)
    compiled = compute.prepare_model(copy.deepcopy(eager), ComputeConfig(compile=True))
    x = torch.rand(4, 3, 16, 16)
    outputs, input_grads = [], []
    for model in (eager, compiled):
        z = x.clone().requires_grad_(True)
        out = model.features(z, 3)
        (grad,) = torch.autograd.grad(out.square().sum(), z)
        outputs.append(out.detach())
        input_grads.append(grad)
    assert not compiled.features.failed
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(input_grads[1], input_grads[0], rtol=1e-5, atol=1e-5)


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(compute.torch, "compile", broken)
    torch.manual_seed(0)
    model = build_model("conv", 1, 8, 10, (0.5,), (0.25,))
    expected = model(torch.ones(2, 1, 8, 8))
    compute.prepare_model(model, ComputeConfig(compile=True))
    with pytest.warns(RuntimeWarning, match="compute.compile=false"):
        got = model(torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        model(torch.ones(2, 1, 8, 8))


def test_the_grouped_engine_does_not_call_the_models_compiled_code():
    """Its wide copy must run its own code: the copy of a compiled model keeps no compiled function."""
    model = compute.prepare_model(build_model("conv", 1, 8, 10, (0.5,), (0.25,)), ComputeConfig(compile=True))
    shell = GroupedEngine()._prepare([model, copy.deepcopy(model)])
    assert "features" not in vars(shell)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="compute.precision='fp16' must be one of fp32, bf16"):
        load_config(None, ["compute.precision=fp16"])


def test_a_run_with_every_speed_option_trains_checkpoints_and_resumes(tmp_path):
    """bf16 + channels-last + the grouped engine through the CLI: the trainer applies them for whole
    epochs (the submodels learn: autocast must not reuse the first step's weights), the checkpoints
    (contiguous safetensors) load back, and the evaluation is sane."""
    from conftest import run_cli

    short = ["vanilla.epochs=3", "dverge.epochs=1", "dverge_advt.epochs=1", "dverge.steps=2", "dverge_advt.steps=2",
             "dverge_advt.adv_steps=2", "eval.num_examples=128", "eval.steps=2", "logging.wandb=disabled",
             "logging.progress=false"]
    options = ["compute.precision=bf16", "compute.channels_last=true", "dverge.engine=grouped",
               "dverge_advt.engine=grouped"]
    run_dir = tmp_path / "run"
    done = run_cli("--run-dir", str(run_dir), *short, *options)
    assert done.returncode == 0, done.stderr
    rows = json.loads((run_dir / "results.json").read_text())["eval"]
    clean = {r["stage"]: r["accuracy"] for r in rows if r["model"] == "mixture" and r["attack"] == "clean"}
    assert set(clean) == {"vanilla", "dverge", "dverge_advt"}
    assert min(clean.values()) > 80, clean  # fp32 gives 95-99 here; untrained models give ~10
    again = run_cli("--run-dir", str(run_dir), "--resume")
    assert again.returncode == 0, again.stderr
    assert "complete and evaluated; skipping" in again.stdout


def test_threads_auto_shares_the_cores_among_the_nodes_processes():
    assert compute.resolve_threads("auto", processes=1, cores=2) == min(2, compute.TORCH_DEFAULT_THREADS)
    assert compute.resolve_threads("auto", processes=3, cores=2) == 1  # never 0
    assert compute.resolve_threads("auto", processes=2, cores=64) <= compute.TORCH_DEFAULT_THREADS
    assert compute.resolve_threads(3, processes=1, cores=2) == 3  # as asked, even if too many
    assert load_config(None, ["compute.threads=4"]).compute.threads == 4
    with pytest.raises(ConfigError, match=r"compute.threads=0 must be >= 1 \(threads per process, or auto\)"):
        load_config(None, ["compute.threads=0"])


def test_more_threads_than_cores_warns_and_sets_the_count(monkeypatch):
    monkeypatch.setattr(compute, "available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = torch.get_num_threads()
    try:
        with pytest.warns(RuntimeWarning, match=r"compute.threads=2 × 2 process\(es\) on this node exceeds its 2 cores"):
            assert compute.set_threads(ComputeConfig(threads=2)) == 2
        assert torch.get_num_threads() == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one thread each on two cores: nothing to warn about, busy or not
            assert compute.set_threads(ComputeConfig(threads="auto")) == 1
    finally:
        torch.set_num_threads(threads)


def test_the_oversubscription_warning_comes_once_per_node_not_once_per_rank(monkeypatch):
    """The README's 3-process CPU recipe: only local rank 0 warns (issue 21, item 6)."""
    monkeypatch.setattr(compute, "available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    threads = torch.get_num_threads()
    try:
        for rank in ("1", "2"):
            monkeypatch.setenv("LOCAL_RANK", rank)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert compute.set_threads(ComputeConfig(threads=1)) == 1
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.warns(RuntimeWarning, match=r"compute.threads=1 × 3 process\(es\) on this node exceeds its 2 cores"):
            compute.set_threads(ComputeConfig(threads=1))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("unit, warns", [("AVX2", True), ("AVX512", False)])
def test_bf16_on_a_cpu_without_avx512_warns_that_fp32_is_faster(monkeypatch, unit, warns):
    """bf16 is emulated on an AVX2-only CPU (2.4x slower vanilla training measured on one): say so once."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: unit)
    cfg = load_config(None, ["compute.precision=bf16"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute.check_compute(cfg, torch.device("cpu"), world_size=1)
        compute.check_compute(load_config(None, ["compute.precision=fp32"]), torch.device("cpu"), world_size=1)
    messages = [str(w.message) for w in caught]
    assert len(messages) == int(warns)
    assert not warns or ("AVX2" in messages[0] and "compute.precision=fp32" in messages[0])
