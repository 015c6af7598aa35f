"""`dvtrain eval` under torchrun (issue 22 item 1): the test images in fixed chunks, each with random
starts from its own stream, and every other part as tasks with streams of their own, shared out over
the ranks; results.json is the same for 1, 2 and 3 processes (bit-identical at one thread per process), and bad input to the launched form is one line, exit 2,
printed once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY
from dvtrain import cli
from dvtrain.config import EvalConfig
from dvtrain.eval.whitebox import Cell, chunk_bounds, chunk_generator, evaluate_stage

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
CHUNKED = ["eval.num_examples=48", "eval.chunk_size=16", "eval.batch_size=8", "eval.seeds=2",
           "eval.full_attacks=[clean,fgsm,pgd_linf,pgd_l2_margin,autoattack,adaptive]",
           "eval.autoattack.version=custom", "eval.autoattack.attacks=[apgd-ce]", "eval.autoattack.iterations=2",
           "eval.autoattack.norms=[Linf]", "eval.autoattack.num_examples=40", "eval.adaptive.steps=2",
           "eval.checks.enabled=false", "eval.transfer.num_images=20", "eval.transfer.steps=1",
           "eval.transfer.restarts=1", "eval.transfer.blackbox_steps=1", "eval.transfer.blackbox_restarts=1",
           "eval.transfer.surrogate_sizes=[2,3]", "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.05,0.1]",
           "eval.diversity.num_images=10", "eval.mixture_only=[]"]


def launch_eval(world: int, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone"]
    cmd = [sys.executable, *launcher, "-m", "dvtrain.cli", "eval", str(run_dir), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_a_chunks_random_starts_do_not_depend_on_the_world_size_or_the_rank():
    """The stream of chunk c is a function of (seed, model, attack, norm, ε, chunk, seed index) alone."""
    cell = Cell("pgd_linf", "Linf", 0.1)
    draws = {c: torch.rand(5, generator=chunk_generator(0, "mixture", cell, c, 0)) for c in range(4)}
    for world in (1, 2, 3):
        for rank in range(world):
            for c in range(rank, 4, world):  # what rank `rank` of `world` computes
                assert torch.equal(torch.rand(5, generator=chunk_generator(0, "mixture", cell, c, 0)), draws[c])
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.rand(5, generator=chunk_generator(0, "sub0", cell, 0, 0)))
    other_eps = torch.rand(5, generator=chunk_generator(0, "mixture", Cell("pgd_linf", "Linf", 0.05), 0, 0))
    assert not torch.equal(draws[0], other_eps)
    assert chunk_bounds(40, 16) == [(0, 14), (14, 27), (27, 40)]  # at most 16, sizes within one of each other


def test_chunks_cover_the_images_once_in_order_with_sizes_within_one():
    """Any (images, chunk_size): ceil(images / chunk_size) chunks of at most chunk_size images, in order,
    sizes differing by at most one, so that round-robin ranks get even shares (issue 22 item 5)."""
    for size in (0, 1, 7, 40, 100, 359, 1000):
        for chunk_size in (1, 3, 16, 100, 500):
            bounds = chunk_bounds(size, chunk_size)
            assert len(bounds) == -(-size // chunk_size)
            assert [i for start, end in bounds for i in range(start, end)] == list(range(size))
            sizes = [end - start for start, end in bounds]
            assert all(0 < s <= chunk_size for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
    halves = [sum(end - start for start, end in chunk_bounds(359, 100)[rank::2]) for rank in (0, 1)]
    assert halves == [180, 179]  # the quickstart's test set over 2 processes; blocks of 100 gave 200/159
    assert EvalConfig().chunk_size >= 1


class OneRank:
    rank, world = 0, 1

    def gather(self, obj):
        return [obj]


def test_the_training_time_table_and_dvtrain_evals_share_path_give_the_same_rows(ensemble):
    """Training scores per-owner submodels and attacks the mixture collectively; `dvtrain eval` computes
    every model per chunk and gathers: both draw each chunk's starts from the same streams."""
    models, data = ensemble
    cfg = EvalConfig(eps=0.1, steps=2, step_size=0.05, l2_eps=0.5, l2_step_size=0.25, num_examples=50, chunk_size=16,
                     batch_size=8, seeds=2, attacks=["clean", "fgsm", "pgd_linf", "pgd_l2_margin"])
    training = evaluate_stage("dverge", models, data.x_test, data.y_test, cfg, seed=4)
    shared = evaluate_stage("dverge", models, data.x_test, data.y_test, cfg, seed=4, share=OneRank())
    assert shared == training and len({r["accuracy"] for r in training}) > 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dist-eval") / "run"
    # Trained long enough to be right on most images, so that the attacks' numbers differ.
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]", "vanilla.epochs=4",
                           "data.train_limit=512"]) == 0
    return run_dir


SECTIONS = ("transfer", "blackbox", "eps_sweep", "diversity")  # besides the rows: every shared-out result


def comparable(results: dict) -> dict:
    """What must not depend on the number of processes: the rows, every evaluation section, and the
    surrogates' description without its paths (each world size writes its own cache)."""
    out = {"rows": [{k: v for k, v in r.items() if k != "command"} for r in results["eval"] if r["table"] == "eval"]}
    out |= {key: results[key] for key in SECTIONS if key != "blackbox"}
    out["blackbox"] = {}
    for stage, table in results["blackbox"].items():
        protocol = {k: v for k, v in table["protocol"].items() if k != "cache"}
        protocol["surrogates"] = [{k: v for k, v in s.items() if k != "dir"} for s in protocol["surrogates"]]
        out["blackbox"][stage] = table | {"protocol": protocol}
    return out


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every example set and surrogate checkpoint of a transfer cache, by relative path."""
    files = [*cache.rglob("examples/**/*.safetensors"), *cache.rglob("checkpoints/vanilla/*.safetensors")]
    return {str(f.relative_to(cache)): f.read_bytes() for f in files}


@pytest.mark.slow
def test_one_two_and_three_processes_write_the_same_results(trained, tmp_path):
    """Everything `dvtrain eval` computes is shared out (white-box chunks; surrogate ensembles, example
    sets, transfer runs, ε-sweep cells and diversity rows as tasks), each world size with a cache of its
    own, so the surrogates and example sets are made by whichever ranks get them: the same bytes."""
    results, caches, crafted = {}, {}, {}
    for world in (1, 2, 3):
        run_dir, cache = tmp_path / f"w{world}", tmp_path / f"cache{world}"
        shutil.copytree(trained, run_dir)
        done = launch_eval(world, run_dir, *CHUNKED, f"eval.transfer.cache_dir={cache}")
        assert done.returncode == 0, done.stderr[-3000:]
        stored = json.loads((run_dir / "results.json").read_text())
        results[world], caches[world] = comparable(stored), cache_files(cache)
        crafted[world] = [p for p in stored["eval_provenance"]["phase_s"] if p.startswith("crafting ")]
    rows = results[1]["rows"]
    assert len(rows) == 4 * 7 + 1  # 3 submodels and the mixture × (5 attacks, 2 worst cases), + adaptive
    assert len({r["accuracy"] for r in rows}) > 4  # the attacks' numbers differ: the comparison can fail
    assert {r["n"] for r in rows if r["attack"] == "autoattack"} == {40}
    assert len(results[1]["blackbox"]["vanilla"]["sets"]) == 2 * 2 * 2 * 2  # 2 ensembles × 2 ε × MI/DI × CE/CW
    assert sum(path.startswith("examples/") for path in caches[1]) == 16 and len(caches[1]) > 16  # + surrogates
    sweep = results[1]["eps_sweep"]["vanilla"]["worst_case"]
    assert len({v for row in sweep for v in row}) > 2
    assert results[2] == results[1] and results[3] == results[1]  # bit-identical: the same floats
    assert caches[2] == caches[1] and caches[3] == caches[1]  # the same bytes, whichever rank made them
    # Rank 0 (whose phases results.json records) crafted only its share of the 16 sets.
    assert len(crafted[1]) == 16 and 0 < len(crafted[2]) < 16 and 0 < len(crafted[3]) < len(crafted[2])


def test_more_processes_than_chunks_is_one_line_exit_2_printed_once(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    done = launch_eval(3, run_dir, "eval.num_examples=32", "eval.chunk_size=16")
    printed = [line for line in done.stderr.splitlines() if line.startswith("dvtrain: ")]
    assert printed == ["dvtrain: error: 3 processes share 2 chunks of eval.chunk_size=16 images (32 test images); "
                       "launch at most 2 processes or lower eval.chunk_size"], done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr.split("Root Cause")[1]
    assert not (tmp_path / "transfer_cache").exists()  # refused before any surrogate was trained


def test_a_missing_stage_under_a_launcher_is_one_line_exit_2_printed_once(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    done = launch_eval(2, run_dir, "--stage", "dverge")
    printed = [line for line in done.stderr.splitlines() if line.startswith("dvtrain: ")]
    assert len(printed) == 1 and "--stage dverge is not a stage of" in printed[0], done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr.split("Root Cause")[1]


def test_each_phase_prints_a_progress_line_and_its_wall_time_is_recorded(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("progress: false", "progress: true"))
    done = subprocess.run([sys.executable, "-m", "dvtrain.cli", "eval", str(run_dir), *CHUNKED],
                          env={**ENV, "DVTRAIN_PROGRESS": "1"}, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    phases = json.loads((run_dir / "results.json").read_text())["eval_provenance"]["phase_s"]
    assert "vanilla mixture adaptive Linf ε=0.1" in phases
    assert any(phase.startswith("surrogate ensemble") for phase in phases)
    for phase in phases:
        assert phase in done.stderr and phases[phase] >= 0
    assert "img/s" in done.stderr
