"""Issue 19, kind 4: the storage fails under a run. Every command checks that it can write where it will write
before any work; a write that fails midway (a full disk: safetensors' own error or OSError ENOSPC) is one line,
exit status 2, every earlier checkpoint kept, no `<stage>.tmp` left, and --resume finishes the run.

Tests run as root, which permission bits do not stop: a read-only folder is made with `chattr +i` where the
machine allows it (skipped otherwise), and the other cases inject the fault (a path below a file, a write
that raises) so that they hold everywhere."""

from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

from conftest import TINY
from dvtrain import checkpoint, cli
from dvtrain import results as results_store
from dvtrain.rundir import RunDir
from dvtrain.eval import evaluate

QUICK = [*TINY, "stages=[vanilla, dverge]", "vanilla.epochs=2", "data.train_limit=128", "eval.num_examples=16",
         "checkpoint.every_steps=2"]
FULL = "No space left on device"


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    assert err.startswith("dvtrain: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def read_only():
    """Make a folder read-only for this process, root included (chmod, else chattr +i); undone afterwards."""
    made = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        made.append(("chmod", folder))
        if _writable(folder):
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
            if done.returncode == 0:
                made.append(("chattr", folder))
            if _writable(folder):
                pytest.skip("no way to make a folder read-only for this user here (root without chattr)")
        return folder

    yield make
    for how, folder in reversed(made):
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


# ----------------------------------------------------------------------------- midway: train


def _fail_nth(monkeypatch, target, name: str, after: int, error: BaseException) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


MIDWAY = {
    "safetensors' own error (a full disk)": (checkpoint, "save_file", 7,
                                             SafetensorError("Error while serializing: IoError(StorageFull)"),
                                             "could not write checkpoint"),
    "ENOSPC from safetensors' file": (checkpoint, "save_file", 13, OSError(errno.ENOSPC, FULL), "could not write checkpoint"),
    "ENOSPC writing results.json": (results_store, "write_together", 0, OSError(errno.ENOSPC, FULL, "results.json"),
                                    "could not write results.json"),
}


@pytest.mark.parametrize("case", sorted(MIDWAY))
def test_a_write_failing_midway_keeps_every_checkpoint_and_resume_finishes(case, tmp_path, monkeypatch, capsys):
    target, name, after, error, expected = MIDWAY[case]
    run_dir = tmp_path / "run"
    _fail_nth(monkeypatch, target, name, after, error)
    assert cli.train_main(["--run-dir", str(run_dir), *QUICK]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert expected in err and "--resume" in err, err
    kept = checkpoint.latest(RunDir(run_dir).checkpoints("vanilla"))
    assert kept is not None
    checkpoint.check_weights(kept, 3)
    assert not list((run_dir / "checkpoints").glob("*.tmp")) and not list((run_dir / "checkpoints").glob("*.trash-*"))
    monkeypatch.undo()
    assert cli.train_main(["--run-dir", str(run_dir), "--resume"]) == 0
    assert checkpoint.read_state(checkpoint.latest(RunDir(run_dir).checkpoints("dverge")))["complete"]


def test_a_state_file_that_cannot_be_written_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == checkpoint.STATE_FILE + ".part" and (self.parent.parent / "vanilla").exists():
            raise OSError(errno.ENOSPC, FULL)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *QUICK]) == cli.EXIT_USER_ERROR
    assert "previous checkpoint is kept" in one_line(capsys.readouterr().err)
    kept = checkpoint.read_state(checkpoint.latest(RunDir(run_dir).checkpoints("vanilla")))
    assert (kept["epoch"], kept["step"]) == (0, 2)  # the first checkpoint (every 2 steps); the second failed
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    monkeypatch.undo()
    assert cli.train_main(["--run-dir", str(run_dir), "--resume"]) == 0


# ----------------------------------------------------------------------------- before any work: train


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("variable", ["WANDB_DATA_DIR", "WANDB_CACHE_DIR"])
def test_a_wandb_folder_that_cannot_be_written_is_refused_before_training(variable, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv(variable, str(_file(tmp_path) / "wandb"))
    args = [o for o in QUICK if not o.startswith("logging.wandb")] + ["logging.wandb=offline", "logging.artifacts=true"]
    assert cli.train_main(["--run-dir", str(tmp_path / "run"), *args]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert f"W&B folder ({variable})" in err and "a-file is a file" in err
    assert not (tmp_path / "run").exists()


def test_a_read_only_run_directory_is_refused_before_resuming(tmp_path, read_only, capsys):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *QUICK, "stages=[vanilla]"]) == 0
    before = digest(run_dir)
    read_only(run_dir)
    assert cli.train_main(["--run-dir", str(run_dir), "--resume", "stages=[vanilla, dverge]"]) == cli.EXIT_USER_ERROR
    assert "cannot be written" in one_line(capsys.readouterr().err)
    assert digest(run_dir) == before


# ----------------------------------------------------------------------------- eval and compare


@pytest.fixture
def trained(vanilla_run) -> Path:
    return vanilla_run  # shared with other modules: copy it before changing it


def _no_work(monkeypatch) -> None:
    def started(*args, **kwargs):
        raise AssertionError("the evaluation (and its surrogate training) started")

    monkeypatch.setattr(evaluate, "full_evaluation", started)


@pytest.mark.parametrize("blocked", ["run/plots", "transfer_cache"])
def test_eval_refuses_a_folder_it_cannot_write_before_any_work(blocked, trained, tmp_path, monkeypatch, capsys):
    """plots/ in the run directory, and the shared transfer cache beside it (surrogates, example sets)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.rmtree(tmp_path / blocked, ignore_errors=True)  # training drew its loss curves into plots/
    (tmp_path / blocked).write_text("a file where dvtrain eval writes a folder")
    _no_work(monkeypatch)
    assert cli.main(["eval", str(run_dir)]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert f"{blocked} cannot be written" in err and "--resume" not in err


def test_eval_on_a_read_only_run_directory_refuses_before_training_surrogates(trained, tmp_path, monkeypatch, read_only,
                                                                            capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    _no_work(monkeypatch)
    read_only(run_dir)
    assert cli.main(["eval", str(run_dir)]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert "cannot be written" in err and "--resume" not in err  # eval has no --resume


def test_eval_whose_results_write_fails_midway_says_run_it_again(trained, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, FULL, str(run_dir / "results.json"))

    monkeypatch.setattr(evaluate, "full_evaluation", full)
    assert cli.main(["eval", str(run_dir)]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert "results.json" in err and FULL in err and "run it again" in err and "--resume" not in err


@pytest.mark.parametrize("option", ["--csv", "--plot"])
def test_compare_refuses_an_output_it_cannot_write_before_reading_runs(option, trained, tmp_path, monkeypatch, capsys):
    from dvtrain.report import compare

    def read(*args, **kwargs):
        raise AssertionError("runs were read")

    monkeypatch.setattr(compare, "read_source", read)
    target = _file(tmp_path) / "out" / "table.x"
    assert cli.main(["compare", str(trained), option, str(target)]) == cli.EXIT_USER_ERROR
    assert f"{option} folder" in one_line(capsys.readouterr().err)


def test_eval_whose_surrogate_cache_cannot_be_written_says_run_it_again_not_resume(trained, tmp_path, monkeypatch,
                                                                                  capsys):
    """The issue's example: eval's surrogate ensemble trained, then its cache fails to save (a full disk):
    one line, and no advice to use --resume, which eval does not have."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        SafetensorError("Error while serializing: IoError(StorageFull)")))
    args = ["eval.transfer.surrogate_epochs=1", "eval.transfer.surrogate_sizes=[1]", "eval.transfer.num_images=16",
            "eval.full_attacks=[clean,fgsm]"]
    assert cli.main(["eval", str(run_dir), *args]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert "could not write checkpoint" in err and "surrogates" in err and "run it again" in err
    assert "--resume" not in err
    assert not list((tmp_path / "transfer_cache").rglob("*.tmp"))
