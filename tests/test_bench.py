"""The machine-independent step figures of `python -m dvtrain.tools.bench`: operators dispatched per DVERGE
step and host synchronisations, in the step and in the stage loop around it."""

from __future__ import annotations

import pytest
import torch

from dvtrain.tools import bench
from dvtrain.cli import train_main
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.train import dverge, frame, loop

CPU = torch.device("cpu")
BATCHES, STEP = dverge.Dverge.batches, frame.StepRunner.__call__
FLUSH, VOTE = loop.StepLog.flush, LocalPlacement.any

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.rand(4)
    g = torch.Generator().manual_seed(0)
    with bench.StepCounter(CPU) as counter:
        float(t.sum())
        if t.max() > 2:  # a data-dependent branch
            pass
        t.tolist()
        t.nonzero()
        torch.rand(3, generator=g)  # on a GPU: a host→device copy follows
        (t * 2).exp()  # none: stays on the device
    assert counter.syncs == {"__float__": 1, "__bool__": 1, "tolist": 1, "nonzero": 1,
                             "random draw on a CPU generator": 1}
    assert counter.ops >= 8


def test_grouped_step_dispatches_under_a_third_of_the_reference_and_never_waits():
    counts = bench.count_columns(bench.SETTINGS[0], [1, 3, 5], bench.ComputeConfig(), CPU)
    ops, syncs = counts["ops_per_step"], counts["host_syncs_per_step"]
    assert ops["grouped"] <= ops["reference"] / 3
    assert ops["grouped"] < ops["loop"] < ops["reference"]
    assert syncs == {"reference": 0, "loop": 0, "grouped": 0}


def _epoch_syncs(monkeypatch, tmp_path, train_images: int) -> dict[str, int]:
    """Host synchronisations inside one DVERGE epoch of the real stage loop, figures reduced every 2
    steps; the reduction itself (`StepLog.flush`, the stop vote) is where waiting is allowed."""
    counter = bench.StepCounter(CPU)

    def counted_batches(self, *args):  # drawing the epoch's layer and batches
        with counter:
            drawn = BATCHES(self, *args)
        while True:
            with counter:
                batch = next(drawn, None)
            if batch is None:
                return
            yield batch

    def counted_step(self, *args):  # a step: sharding, the stage's loss, the update
        with counter:
            return STEP(self, *args)

    def allowed(method):
        def call(*args, **kwargs):
            counter.inside_read += 1
            try:
                return method(*args, **kwargs)
            finally:
                counter.inside_read -= 1
        return call

    monkeypatch.setattr(dverge.Dverge, "batches", counted_batches)
    monkeypatch.setattr(frame.StepRunner, "__call__", counted_step)
    monkeypatch.setattr(loop.StepLog, "flush", allowed(FLUSH))
    monkeypatch.setattr(LocalPlacement, "any", allowed(VOTE))
    code = train_main([
        "--run-dir", str(tmp_path / f"run{train_images}"), "stages=[vanilla, dverge]", "vanilla.epochs=0",
        "dverge.epochs=1", "dverge.steps=1", "dverge.batch_size=32", "dverge.engine=grouped",
        f"data.train_limit={train_images}", "data.augment=true", "data.crop_padding=1", "logging.every_steps=2",
        "eval.num_examples=16", "eval.steps=1", "logging.wandb=disabled", "logging.progress=false",
    ])
    assert code == 0
    return counter.syncs


def test_the_stage_loop_waits_only_when_it_reduces_the_figures(monkeypatch, tmp_path):
    """4 and 8 steps wait equally often: every wait is once per epoch (the layer draw, the shuffles and
    the augmentation's draws), none per step."""
    short, long = (_epoch_syncs(monkeypatch, tmp_path, n) for n in (128, 256))
    assert short == long
    assert sum(long.values()) <= 8


def test_cuda_graphs_are_refused_on_the_cpu_with_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, run_cli

    bench_run = subprocess.run([sys.executable, "-m", "dvtrain.tools.bench", "--quick", "--device", "cpu", "--cuda-graphs"],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    train_run = run_cli("--run-dir", str(tmp_path / "run"), "device=cpu", "compute.cuda_graphs=true",
                        "logging.wandb=disabled")
    for done in (bench_run, train_run):
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "compute.cuda_graphs=true needs a CUDA device" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_eval_bench_times_every_attack_at_one_and_two_launched_processes():
    """`python -m dvtrain.tools.bench --eval` (issue 22 item 5): two real launches (torchrun, gloo) of
    `evaluate_stage` shared over the processes; a figure per attack and process count, and the JSON last."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    attacks = ["clean", "pgd_linf", "adaptive"]
    done = subprocess.run(
        [sys.executable, "-m", "dvtrain.tools.bench", "--eval", "--procs", "1", "2", "--device", "cpu", "--images", "8",
         "--train-epochs", "0", "--attacks", ",".join(attacks), "eval.chunk_size=4", "eval.steps=1", "eval.adaptive.steps=1",
         "eval.adaptive.blend_scales=[0.5]", "eval.adaptive.target_classes=1"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["procs"] == [1, 2] and report["chunks"] == 2 and report["images"] == 8
    assert list(report["attacks"]) == attacks
    for name, figures in report["attacks"].items():
        # clean and PGD on the 3 submodels and the mixture, the adaptive attack on the mixture only
        assert figures["models"] == (1 if name == "adaptive" else 4)
        assert figures["images"] == 8 * figures["models"]
        assert all(figures["images_per_s"][p] > 0 and figures["seconds"][p] > 0 for p in ("1", "2"))
        assert figures["speedup"]["2"] > 0 and 1 <= figures["split_bound_speedup"]["2"] <= 2
        assert len(figures["cpu_s"]["1"]) == 1 and len(figures["cpu_s"]["2"]) == 2  # one per process
        assert any(line.split()[:1] == [name] for line in lines[:-1])  # a row of the printed table
    assert report["overall"]["images"] == sum(f["images"] for f in report["attacks"].values())
    assert report["overall"]["speedup"]["2"] > 0 and any(line.startswith("overall") for line in lines[:-1])
