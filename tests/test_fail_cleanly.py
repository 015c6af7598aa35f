"""`dvtrain eval` and `dvtrain compare` fail as cleanly as `dvtrain train` (issue 13): a damaged or wrong
path, or a run with nothing to evaluate, is refused with one line and exit 2 before any work; Ctrl-C exits
130 and SIGTERM 143 with one line, leaving results.json, caches and outputs as they were; a refusal that
every rank reaches is printed once. (train's cases: test_bad_inputs.py; ranges: test_config_ranges.py.)"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY
from dvtrain import cli
from dvtrain.eval import evaluate, surrogates
from dvtrain.report import compare
from dvtrain.train import loop

WEIGHTS = Path("checkpoints") / "vanilla"


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".lock"}  # a run directory's empty lock files hold no data


@pytest.fixture
def trained(vanilla_run) -> Path:
    """A finished vanilla stage with a results.json (what `dvtrain train` leaves), shared with other
    modules: copy it before changing it."""
    return vanilla_run


# `dvtrain eval` computes its white-box table before the surrogates: a cheap one reaches them at once.
QUICK_TABLE = ["eval.full_attacks=[clean,fgsm]"]


def one_line(err: str) -> str:
    assert err.startswith("dvtrain: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- dvtrain eval: refusals


def _edit(run_dir: Path, rel: str, content: bytes | None) -> None:
    target = run_dir / rel
    if content is None:
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    else:
        target.write_bytes(content)


def _config(run_dir: Path, **changes) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg.update(changes)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def _state(complete: bool):
    return lambda run: _edit(run, str(WEIGHTS / "state.json"), json.dumps({"complete": complete, "epoch": 0}).encode())


EVAL_CASES = {
    # preconditions (kind 4): nothing to evaluate is refused before the surrogate ensemble is trained
    "no checkpoint at all": (lambda run: _edit(run, "checkpoints", None), [], "has no finished stage to evaluate"),
    "stage not finished": (_state(False), [], "has no finished stage to evaluate"),
    "--stage not in the run": (None, ["--stage", "dverge"], "--stage dverge is not a stage of"),
    "--stage not trained yet": (lambda run: _config(run, stages=["vanilla", "dverge"]), ["--stage", "dverge"],
                                "stage dverge has no finished checkpoint"),
    "weights truncated": (lambda run: _edit(run, str(WEIGHTS / "sub1.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                          [], "sub1.safetensors is corrupt or truncated"),
    "weights missing": (lambda run: _edit(run, str(WEIGHTS / "sub2.safetensors"), None), [], "has no weights for submodel 2"),
    "training override": (None, ["dverge.eps=0.1"], "only accepts eval.* and device overrides"),
    # paths and files (kind 2)
    "run directory is a file": ("file", [], "is a file, not a folder"),
    "not a run directory": ("empty", [], "is not a dvtrain run directory (no config.yaml)"),
    "config not UTF-8": (lambda run: _edit(run, "config.yaml", b"\xff\xfe\x00"), [], "config.yaml is not UTF-8 text"),
    "config not YAML": (lambda run: _edit(run, "config.yaml", b"seed: [1\n"), [], "is not valid YAML at line"),
    "state.json not JSON": (lambda run: _edit(run, str(WEIGHTS / "state.json"), b"{\"complete\": tr"), [],
                            "state.json is not valid JSON"),
    "state.json a list": (lambda run: _edit(run, str(WEIGHTS / "state.json"), b"[1]"), [], "holds a JSON list"),
    "results.json not JSON": (lambda run: _edit(run, "results.json", b"{\"eval\": ["), [], "results.json is not valid JSON"),
    "results.json not UTF-8": (lambda run: _edit(run, "results.json", b"\x89PNG"), [], "results.json is not UTF-8 text"),
    "results.json a folder": (lambda run: (_edit(run, "results.json", None), (run / "results.json").mkdir()), [],
                              "results.json is a folder, not a file"),
    "results.json without its table": (lambda run: _edit(run, "results.json", b"{\"eval\": 3}"), [], "has no list under 'eval'"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_refuses_before_any_work(case, trained, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(evaluate, "full_evaluation", no_work)
    prepare, extra, message = EVAL_CASES[case]
    run_dir = tmp_path / "run"
    if prepare == "file":
        run_dir.write_text("not a folder")
    elif prepare == "empty":
        run_dir.mkdir()
    else:
        shutil.copytree(trained, run_dir)
        if prepare is not None:
            prepare(run_dir)
    if extra[:1] == ["--env"]:
        monkeypatch.setenv(*extra[1].split("="))
        extra = []
    before = digest(run_dir) if run_dir.is_dir() else run_dir.read_bytes()
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), *extra]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert err.startswith("dvtrain: error: ") and message in err, err
    assert (digest(run_dir) if run_dir.is_dir() else run_dir.read_bytes()) == before
    assert not (tmp_path / surrogates.CACHE_DIR).exists()  # no surrogate trained for nothing


# ----------------------------------------------------------------------------- dvtrain compare: refusals


def _results(tmp_path: Path, content: bytes) -> Path:
    run = tmp_path / "other"
    run.mkdir()
    (run / "results.json").write_bytes(content)
    return run


COMPARE_CASES = {
    "results.json not UTF-8": (lambda t, r: [str(_results(t, b"\xff\x00"))], "results.json is not UTF-8 text"),
    "results.json a list": (lambda t, r: [str(_results(t, b"[]"))], "holds a JSON list, not the object dvtrain writes"),
    "results.json rows without keys": (lambda t, r: [str(_results(t, b'{"eval": [{"stage": "vanilla"}]}'))],
                                       "eval[0] (vanilla) has no model name"),  # the store names the entry
    "results.json a folder": (lambda t, r: [str(_folder(t / "other" / "results.json").parent)], "neither a dvtrain run directory"),
    "damaged offline W&B run": (lambda t, r: [str(_wandb_file(t))], "cannot read the W&B run at"),
    "W&B path with a space": (lambda t, r: ["team/my project/abc"], "does not exist; pass a run directory"),
    "W&B run that cannot be read": (lambda t, r: ["team/dvtrain/abc123", "--env", "unreachable"], "cannot read the W&B group or run team/dvtrain/abc123"),
    "CSV into a missing folder": (lambda t, r: [str(r), "--csv", str(t / "no" / "t.csv")], "cannot write"),
    "CSV onto a folder": (lambda t, r: [str(r), "--csv", str(_folder(t / "csv"))], "cannot write"),
}


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _wandb_file(tmp_path: Path) -> Path:
    run = _folder(tmp_path / "offline-run-20260101_000000-abc")
    (run / "run-abc.wandb").write_bytes(b"not a transaction log" * 10)
    return run


@pytest.mark.parametrize("case", sorted(COMPARE_CASES))
def test_compare_refuses_with_one_line(case, trained, tmp_path, capsys, monkeypatch):
    args = COMPARE_CASES[case][0](tmp_path, trained)
    if "--env" in args:
        def unreachable():
            raise ConnectionError("no network")

        monkeypatch.setattr(compare, "_wandb_api", unreachable)
        args = args[: args.index("--env")]
    before = digest(trained)
    capsys.readouterr()
    assert cli.main(["compare", *args]) == cli.EXIT_USER_ERROR
    err = one_line(capsys.readouterr().err)
    assert COMPARE_CASES[case][1] in err, err
    assert digest(trained) == before


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM (kind 3)


def _signal_self(signum: int):
    def send(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives before this ends
        raise AssertionError("the signal did not stop the command")

    return send


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_eval_stops_with_one_line_and_leaves_results_as_they_were(signum, code, trained, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = digest(run_dir)
    monkeypatch.setattr(loop, "train_in_process", _signal_self(signum))
    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), *QUICK_TABLE]) == code
    err = one_line(capsys.readouterr().err)
    assert "results.json and the surrogate cache are as they were or complete" in err
    assert digest(run_dir) == before and signal.getsignal(signal.SIGTERM) is handler  # handler restored


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_compare_stops_with_one_line_and_writes_no_table(signum, code, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "read_run_dir", _signal_self(signum))
    capsys.readouterr()
    assert cli.main(["compare", str(trained), "--csv", str(tmp_path / "t.csv")]) == code
    assert "no file was written half" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_train_stopped_by_sigterm_before_its_loop_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_context", _signal_self(signal.SIGTERM))
    capsys.readouterr()
    assert cli.train_main(["--run-dir", str(tmp_path / "run"), *TINY]) == cli.EXIT_TERMINATED
    assert "stopped by SIGTERM; the last checkpoint is kept" in one_line(capsys.readouterr().err)


def test_ctrl_c_in_a_real_eval_process(trained, tmp_path):
    """The issue's example: Ctrl-C while `dvtrain eval` trains its surrogate ensemble printed a traceback."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = digest(run_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dvtrain.cli", "eval", str(run_dir), "eval.transfer.surrogate_epochs=500",
                             *QUICK_TABLE],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the work has begun
        if "training the surrogate ensemble" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED
    assert "interrupted; results.json and the surrogate cache are as they were" in one_line(err)
    assert digest(run_dir) == before


# ----------------------------------------------------------------------------- once per launch (kind 6)


def test_a_refusal_every_rank_reaches_is_printed_by_rank_0_only(tmp_path, capsys, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for rank, printed in (("1", ""), ("0", "dvtrain: error: dverge.eps=2.0 must be in [0, 1]")):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert cli.train_main(["--run-dir", str(tmp_path / "run"), "dverge.eps=2"]) == cli.EXIT_USER_ERROR
        assert capsys.readouterr().err.startswith(printed)
        # torchrun's failure summary shows this line instead of "To enable traceback see ..."
        record = json.loads(error_file.read_text())
        assert record["message"]["extraInfo"]["py_callstack"].startswith("dvtrain: error: dverge.eps=2.0 must be")
    assert not (tmp_path / "run").exists()
