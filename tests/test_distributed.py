"""Several CPU processes (gloo) give the same submodels as one process, and a failing rank stops all."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from dvtrain.distributed.placement import ProcessGroupPlacement, owned_by

# A shortened quickstart that still learns, so the evaluation compares meaningful numbers.
SHORT = [
    "vanilla.epochs=5",
    "dverge.epochs=2",
    "dverge_advt.epochs=1",
    "dverge.steps=3",
    "dverge_advt.steps=3",
    "dverge_advt.adv_steps=3",
    "data.train_limit=512",
    # the baselines, one short epoch each from scratch: their regularisers gather the other submodels'
    # predictions and input gradients
    "stages=[vanilla, dverge, dverge_advt, adp, gal, trs]",
    "adp.epochs=1",
    "gal.epochs=1",
    "trs.epochs=1",
    "trs.pgd_steps=2",
    "eval.num_examples=120",
    "eval.steps=3",
    "logging.wandb=disabled",
    "logging.progress=false",
]
STAGES = ("vanilla", "dverge", "dverge_advt")
BASELINES = ("adp", "gal", "trs")
# One thread per process everywhere, as torchrun sets it: CPU kernels then sum in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(world: int, run_dir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    train = str(REPO / "launch" / "train.py")
    cmd = [sys.executable, train] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone", train
    ]
    return subprocess.run(
        [*cmd, "--run-dir", str(run_dir), *args], env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def weights(run_dir: Path, stage: str) -> dict:
    return {i: load_file(run_dir / "checkpoints" / stage / f"sub{i}.safetensors") for i in range(3)}


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[i][k] - b[i][k]).abs().max()) for i in a for k in a[i])


def test_ownership_is_a_partition():
    for size in range(2, 9):
        for world in range(1, size + 1):
            owned = [owned_by(r, world, size) for r in range(world)]
            assert sorted(i for o in owned for i in o) == list(range(size))
            assert all(owned)  # no idle rank
            p = ProcessGroupPlacement(size, 0, world, torch.device("cpu"))
            assert len(p.rows) == size and p.replicas.shard(torch.arange(10))[0].tolist() == list(range(10))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("w1") / "run"
    done = launch(1, run_dir, *SHORT)
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_multi_process_matches_single_process(single, tmp_path, world):
    run_dir = tmp_path / "run"
    done = launch(world, run_dir, *SHORT)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in STAGES + BASELINES:
        assert max_difference(weights(single, stage), weights(run_dir, stage)) <= 1e-5, stage
    rows_1 = json.loads((single / "results.json").read_text())["eval"]
    rows_w = json.loads((run_dir / "results.json").read_text())["eval"]
    assert [(r["stage"], r["model"], r["attack"]) for r in rows_1] == [(r["stage"], r["model"], r["attack"]) for r in rows_w]
    one_image = 100 / 120
    assert all(abs(a["accuracy"] - b["accuracy"]) <= one_image + 1e-9 for a, b in zip(rows_1, rows_w))
    clean = {r["model"]: r["accuracy"] for r in rows_w if r["stage"] == "vanilla" and r["attack"] == "clean"}
    assert clean["mixture"] > 50  # the comparison is about trained models, not chance
    # one process prints and logs
    assert done.stdout.count("### dverge_advt") == 1 and done.stdout.count("### trs") == 1


# Reported on another session's machine (AMD EPYC, torch 2.14.1): the vanilla weights of 6 ranks 0.043 from one
# process after 5 epochs. Not reproduced on the issue-27 machine: this test passed there (every stage within 1e-5),
# as did 6 ranks vs 1 on vanilla alone with main's code (1.4e-6), and test_replicas.py pins that a replica split
# differs by rounding only (float64: 1e-16). Kept non-strict until it is rerun where it failed (docs/distributed.md).
@pytest.mark.xfail(reason="replicas vs one process: 0.043 apart in vanilla on one machine (AMD EPYC), within 1e-5 on "
                          "another; see docs/distributed.md, 'Replicas and one process'", strict=False)
@pytest.mark.slow
def test_replicas_split_batches_and_match_single_process(single, tmp_path):
    """6 ranks for 3 submodels: two data-parallel replicas each. Part-batch gradients summed in the
    owner group equal the full-batch gradient up to float rounding. Random starts are drawn per part,
    so +AdvT (random-start PGD) is compared loosely."""
    run_dir = tmp_path / "run"
    done = launch(6, run_dir, *SHORT)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("vanilla", "dverge", *BASELINES):  # the baselines draw their noise for the whole batch
        assert max_difference(weights(single, stage), weights(run_dir, stage)) <= 1e-5, stage
    assert max_difference(weights(single, "dverge_advt"), weights(run_dir, "dverge_advt")) <= 0.1
    assert sorted(p.name for p in (run_dir / "checkpoints" / "dverge").glob("sub*.safetensors")) == [
        "sub0.resume.safetensors", "sub0.safetensors", "sub1.resume.safetensors", "sub1.safetensors",
        "sub2.resume.safetensors", "sub2.safetensors",
    ]


@pytest.mark.slow
def test_checkpoints_move_between_world_sizes(single, tmp_path):
    three_then_one = tmp_path / "a"
    assert launch(3, three_then_one, *SHORT, "stages=[vanilla]").returncode == 0
    resumed = launch(1, three_then_one, "--resume", "stages=[vanilla, dverge, dverge_advt]")
    assert resumed.returncode == 0, resumed.stderr
    one_then_three = tmp_path / "b"
    assert launch(1, one_then_three, *SHORT, "stages=[vanilla]").returncode == 0
    resumed = launch(3, one_then_three, "--resume", "stages=[vanilla, dverge, dverge_advt]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in STAGES:
        assert max_difference(weights(single, stage), weights(three_then_one, stage)) <= 1e-5
        assert max_difference(weights(single, stage), weights(one_then_three, stage)) <= 1e-5


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_quickly(tmp_path):
    run_dir = tmp_path / "run"
    assert launch(1, run_dir, *SHORT, "stages=[vanilla]").returncode == 0
    damaged = run_dir / "checkpoints" / "vanilla" / "sub2.safetensors"  # owned by rank 2 of 3
    damaged.write_bytes(damaged.read_bytes()[:64])
    start = time.monotonic()
    done = launch(3, run_dir, "--resume", "stages=[vanilla, dverge]", "dist.timeout_s=60", timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < 60
    assert "sub2.safetensors is corrupt or truncated" in done.stderr
    # Since the pre-run checks read every checkpoint's weights (issue 28, kind 3), each rank usually refuses
    # the damaged file itself before any collective; otherwise the others either see the broken collective
    # first ("lost a peer process") or are stopped by torchrun's SIGTERM when it notices the failed rank (rank
    # 0 says so): a race of the launcher's monitoring, seen both ways. Either way every rank stops in time.
    every_rank_refused = done.stderr.count("sub2.safetensors is corrupt or truncated") >= 3
    assert every_rank_refused or "lost a peer process" in done.stderr or "dvtrain: stopped by SIGTERM" in done.stderr, (
        done.stderr[-3000:])


@pytest.mark.parametrize("override, message", [
    ("ensemble.size=2", "launched 3 processes for ensemble.size=2; launch at most 2 processes, or a multiple of 2"),
    # Was flaky (about half the runs on 2026-12-05): every rank refused at once and torchrun SIGTERMed the others
    # when the first exited, so rank 0 was at times stopped before, while or after printing. The other ranks now
    # wait for that SIGTERM (runtime.wait_for_launcher_stop): rank 0 always exits first.
    ("dverge.eps=2", "dverge.eps=2.0 must be in [0, 1]"),
])
def test_a_refusal_of_every_rank_is_printed_once_and_ends_the_launchers_summary(override, message, tmp_path):
    """Ranks neither below nor a multiple of the submodels, or a bad value: rank 0 prints the line once (the
    others stay silent), every rank exits 2, and torchrun's failure summary (its exit status is its own, 1)
    names the same line as the root cause instead of "To enable traceback see ..."."""
    done = launch(3, tmp_path / "run", *SHORT, override, timeout=120)
    assert done.returncode != 0
    printed = [line for line in done.stderr.splitlines() if line.startswith("dvtrain: ")]
    assert printed == [f"dvtrain: error: {message}" + printed[0].split(message, 1)[1]], done.stderr
    root_cause = done.stderr.split("Root Cause")[1]
    assert f"traceback : dvtrain: error: {message}" in root_cause and "exitcode  : 2" in root_cause
    assert "rank      : 0 " in root_cause  # the rank that printed the line exited first
    assert not (tmp_path / "run").exists()


def test_a_batch_that_leaves_a_replica_without_rows_is_refused_before_training(tmp_path):
    """4 ranks for 2 submodels: 2 replicas each. 512 images in batches of 511 leave a last batch of one row,
    so one replica would get none: refused up front, once, naming the batch size (not the learning rate)."""
    done = launch(4, tmp_path / "run", *SHORT, "ensemble.size=2", "stages=[vanilla]", "vanilla.batch_size=511",
                  timeout=120)
    assert done.returncode != 0
    printed = [line for line in done.stderr.splitlines() if line.startswith("dvtrain: ")]
    assert len(printed) == 1 and "vanilla.batch_size=511 with 512 training images gives a batch of 1 row(s)" in printed[0]
    assert "lr" not in printed[0] and not (tmp_path / "run").exists()


def _workers(launcher_pid: int) -> list[int]:
    """The training processes torchrun started (its children running launch/train.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher_pid and b"launch/train.py" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.slow
def test_a_killed_rank_stops_every_rank_quickly(tmp_path):
    run_dir = tmp_path / "run"
    train = str(REPO / "launch" / "train.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--standalone", train,
           "--run-dir", str(run_dir), *SHORT, "vanilla.epochs=200", "dist.timeout_s=60"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoints" / "vanilla" / "state.json").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert len(workers) == 3
        os.kill(workers[1], 9)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode != 0 and elapsed < 30
    # The survivors either see the broken collective first ("lost a peer process", each on its own line) or
    # are stopped by torchrun's SIGTERM when it notices the killed rank (rank 0 says so): a race of the
    # launcher's monitoring, seen both ways (CI, 2026-12-05). Either way torchrun's summary names the rank.
    lost = [line for line in stderr.splitlines() if "lost a peer process" in line]
    assert all(line.startswith("dvtrain: error: rank ") and line.count("dvtrain:") == 1 for line in lost), lost
    stopped = "dvtrain: stopped by SIGTERM (the launcher stops every rank when one fails" in stderr
    assert lost or stopped, stderr[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", stderr), stderr[-3000:]
    state = json.loads((run_dir / "checkpoints" / "vanilla" / "state.json").read_text())
    assert state["epoch"] >= 1  # the last whole checkpoint is still there
