"""Nothing is lost: kill -9, Ctrl-C and SIGTERM at any step, full disks and NaN losses.

The kill tests run the real CLI in subprocesses and compare the resumed run's final weights with an
uninterrupted run's, bit for bit.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO
from dvtrain import checkpoint, cli
from dvtrain.report.wandb_reader import offline_run_info, read_offline_run

# Several epochs of a few steps each, a checkpoint every 2 steps: kills land inside epochs.
LONG = [
    "vanilla.epochs=6", "dverge.epochs=4", "stages=[vanilla, dverge]", "data.train_limit=320",
    "vanilla.batch_size=32", "dverge.batch_size=64", "dverge.steps=3", "eval.num_examples=40", "eval.steps=1",
    "checkpoint.every_steps=2", "logging.wandb=disabled", "logging.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = str(REPO / "launch" / "train.py")


def command(world: int, *args: str) -> list[str]:
    if world == 1:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), TRAIN, *args]


def final_weights(run_dir: Path, stage: str = "dverge") -> dict:
    folder = run_dir / "checkpoints" / stage
    return {f.name: load_file(f) for f in sorted(folder.glob("sub?.safetensors"))}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        for key in a[name]:
            assert a[name][key].equal(b[name][key]), (name, key)


def checkpoint_progress(run_dir: Path) -> tuple[str, int, int] | None:
    for stage in ("dverge", "vanilla"):
        found = checkpoint.latest(run_dir / "checkpoints" / stage)
        if found is not None:
            try:
                state = json.loads((found / "state.json").read_text())
            except (OSError, ValueError):
                return None
            return stage, state["epoch"], state["step"]
    return None


def run_until_then(world: int, run_dir: Path, sig: int, after_checkpoints: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """Start a run, wait until `after_checkpoints` checkpoints were written, then send `sig` to it."""
    proc = subprocess.Popen(command(world, "--run-dir", str(run_dir), *LONG, *extra), env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen, last = 0, None
    deadline = time.monotonic() + 120
    try:
        while seen < after_checkpoints:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            now = checkpoint_progress(run_dir)
            if now is not None and now != last:
                seen, last = seen + 1, now
            time.sleep(0.02)
        os.killpg(proc.pid, sig) if world > 1 or sig == signal.SIGKILL else proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(command(1, "--run-dir", str(run_dir), *LONG), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(straight, tmp_path, world):
    run_dir = tmp_path / "run"
    after = random.Random().randint(2, 12)
    killed = run_until_then(world, run_dir, signal.SIGKILL, after)
    assert killed.returncode != 0
    stage, epoch, step = checkpoint_progress(run_dir)
    resumed = subprocess.run(command(world, "--run-dir", str(run_dir), "--resume"), env=ENV, cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, f"killed after {after} checkpoints at {stage} {epoch}/{step}: {resumed.stderr[-2000:]}"
    assert_identical(final_weights(straight, "vanilla"), final_weights(run_dir, "vanilla"))
    assert_identical(final_weights(straight), final_weights(run_dir))


@pytest.mark.slow
def test_ctrl_c_checkpoints_inside_the_epoch_and_resumes_exactly(straight, tmp_path):
    run_dir = tmp_path / "run"
    stopped = run_until_then(1, run_dir, signal.SIGINT, 3)
    assert stopped.returncode == cli.EXIT_INTERRUPTED
    assert "a checkpoint was saved there" in stopped.stderr and "Traceback" not in stopped.stderr
    resumed = subprocess.run(command(1, "--run-dir", str(run_dir), "--resume"), env=ENV, cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(final_weights(straight), final_weights(run_dir))


@pytest.mark.slow
def test_sigterm_flushes_every_logged_step_to_wandb(tmp_path):
    run_dir = tmp_path / "run"
    stopped = run_until_then(1, run_dir, signal.SIGTERM, 4, ["logging.wandb=offline"])
    assert stopped.returncode != 0
    stage, epoch, step = checkpoint_progress(run_dir)
    # the stopped stage's W&B run (folder names sort by second, then by a random id: not by start)
    (records,) = [records for records in map(read_offline_run, (run_dir / "wandb").glob("offline-run-*"))
                  if offline_run_info(records).job_type == stage]
    steps = [r["history"]["step"]["num"] for r in records if r["type"] == "history"]
    assert steps == list(range(1, len(steps) + 1))  # every step, none missing
    steps_per_epoch = 10 if stage == "vanilla" else 5
    assert len(steps) >= epoch * steps_per_epoch + step  # at least everything the checkpoint covers
    assert any(r["type"] == "exit" for r in records)  # the run was finished, not abandoned


@pytest.mark.slow
def test_sigkill_then_resume_continues_one_wandb_run_per_stage_without_a_gap(tmp_path):
    """kill -9 at a random checkpoint, --resume: each stage is one W&B run (one id) whose pieces hold
    every step 1..N, and the end of the run names the `wandb sync` command."""
    run_dir = tmp_path / "run"
    after = random.Random().randint(3, 12)
    killed = run_until_then(1, run_dir, signal.SIGKILL, after, ["logging.wandb=offline"])
    assert killed.returncode != 0
    resumed = subprocess.run(command(1, "--run-dir", str(run_dir), "--resume"), env=ENV, cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in resumed.stdout
    pieces: dict[str, list] = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        records = read_offline_run(folder)
        info = offline_run_info(records)
        steps = {r["history"]["step"]["num"] for r in records if r["type"] == "history"}
        if info.run_id or steps:  # (a run killed while W&B started holds no record at all)
            pieces.setdefault(info.job_type, []).append((info.run_id, steps))
    steps_per_epoch = {"vanilla": 10, "dverge": 5}  # 320 images in batches of 32 and 64
    epochs = {"vanilla": 6, "dverge": 4}
    assert set(pieces) == set(epochs), f"killed after {after} checkpoints"
    for stage, found in pieces.items():
        assert len({run_id for run_id, _ in found}) == 1, (stage, after, found)
        logged = set().union(*(steps for _, steps in found))
        assert logged == set(range(1, epochs[stage] * steps_per_epoch[stage] + 1)), (stage, after)


def test_nan_loss_stops_with_step_and_submodel_and_keeps_the_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *LONG, "vanilla.epochs=1", "dverge.optim.lr=1e12", "dverge.optim.momentum=0.0"]
    assert cli.train_main(args) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "is not finite at dverge epoch 1 step" in err and "submodel" in err and "last good checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    state = checkpoint.read_state(checkpoint.latest(run_dir / "checkpoints" / "vanilla"))
    assert state["complete"]


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:  # the first checkpoint (3 submodels × 2 files) goes through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    assert cli.train_main(["--run-dir", str(run_dir), *LONG]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoint is kept" in err
    found = checkpoint.latest(run_dir / "checkpoints" / "vanilla")
    assert checkpoint.read_state(found)["step"] == 2
    assert not (run_dir / "checkpoints" / "vanilla.tmp").exists()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert cli.train_main(["--run-dir", str(run_dir), "--resume"]) == 0


def test_wandb_online_unreachable_fails_fast_and_clearly(tmp_path):
    env = {**ENV, "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    start = time.monotonic()
    done = subprocess.run(
        # a 1 s deadline that did not reach wandb.init leaves W&B its own 90 s, past the 60 s bound below
        command(1, "--run-dir", str(tmp_path / "run"), *LONG, "logging.wandb=online", "logging.init_timeout_s=1"),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == cli.EXIT_USER_ERROR
    assert time.monotonic() - start < 60
    assert "W&B could not start in online mode" in done.stderr and "logging.wandb=offline" in done.stderr
    assert "Traceback" not in done.stderr


def test_api_key_never_reaches_the_run_directory(tmp_path):
    secret = "s3cr3t" * 7
    run_dir = tmp_path / "run"
    env = {**ENV, "WANDB_API_KEY": secret}
    done = subprocess.run(command(1, "--run-dir", str(run_dir), *LONG, "vanilla.epochs=1", "stages=[vanilla]",
                                  "logging.wandb=offline"), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
