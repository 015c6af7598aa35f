"""Issue 28, kind 11: the natural launcher forms, as real processes.

`python -m dvtrain COMMAND` is the `dvtrain` command (dvtrain/__main__.py). `torchrun ... -m dvtrain eval RUN`
works from any folder, and `torchrun ... dvtrain eval RUN` without `--no-python` (torchrun then runs
`python -u dvtrain ...`, and Python looks for `dvtrain` in the current folder, never on PATH) works in the
repository's top folder, where `dvtrain` is the package's folder; anywhere else Python itself stops before
dvtrain starts, which the docs say.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
# A small but whole evaluation (every phase runs).
SMALL = ["eval.transfer.num_images=20", "eval.transfer.steps=1", "eval.transfer.restarts=1",
         "eval.transfer.blackbox_steps=1", "eval.transfer.blackbox_restarts=1", "eval.transfer.surrogate_sizes=[2]",
         "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.1]", "eval.transfer.blackbox_attacks=[mi_pgd]",
         "eval.transfer.blackbox_losses=[ce]", "eval.full_attacks=[clean,fgsm,pgd_linf]", "eval.checks.long_steps=2",
         "eval.diversity.num_images=20", "eval.num_examples=32", "eval.chunk_size=16", "eval.steps=2"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_python_dash_m_dvtrain_is_the_dvtrain_command(tmp_path):
    import dvtrain

    done = run([sys.executable, "-m", "dvtrain", "--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"dvtrain {dvtrain.__version__}", done.stderr
    done = run([sys.executable, "-m", "dvtrain", "eval", str(tmp_path / "missing")], tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("dvtrain: error: ") and done.stderr.count("\n") == 1, done.stderr


def test_python_runs_the_package_folder_as_the_command_without_its_modules_shadowing_others(tmp_path):
    """`python dvtrain ...` in the top folder (what torchrun without --no-python starts): sys.path gets the
    folder's parent, not the package folder, whose `data`, `config`, ... modules would shadow top-level ones."""
    done = run([sys.executable, "dvtrain", "--version"], REPO)
    assert done.returncode == 0 and done.stdout.startswith("dvtrain "), done.stderr
    probe = ("import runpy, sys; sys.argv = ['dvtrain', '--version']\n"
             "try:\n    runpy.run_path('dvtrain', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print([p for p in sys.path if p.endswith('/dvtrain')], sys.modules['dvtrain'].__file__)")
    done = run([sys.executable, "-c", probe], REPO)
    assert done.stdout.strip().endswith(f"[] {REPO / 'dvtrain' / '__init__.py'}"), done.stdout + done.stderr


def _refusal_under_torchrun(args: list[str], cwd: Path, run_dir: Path) -> str:
    """torchrun with 2 ranks on a folder with nothing to evaluate: dvtrain itself starts on both ranks and
    refuses; rank 0 prints the line once."""
    run_dir.mkdir()
    done = run([*TORCHRUN, *args, "eval", str(run_dir)], cwd)
    assert done.returncode != 0
    printed = [line for line in done.stderr.splitlines() if line.startswith("dvtrain: error:")]
    return printed[0] if len(printed) == 1 else done.stderr


def test_torchrun_without_no_python_starts_dvtrain_in_the_top_folder(tmp_path):
    line = _refusal_under_torchrun(["dvtrain"], REPO, tmp_path / "empty")
    assert line.startswith("dvtrain: error: ") and "is not a dvtrain run directory" in line, line


def test_torchrun_dash_m_dvtrain_starts_dvtrain_from_any_folder(tmp_path):
    line = _refusal_under_torchrun(["-m", "dvtrain"], tmp_path, tmp_path / "empty")
    assert line.startswith("dvtrain: error: ") and "is not a dvtrain run directory" in line, line


def test_torchrun_without_no_python_elsewhere_stops_in_python_as_the_docs_say(tmp_path):
    """Python, not dvtrain, stops: it looks for ./dvtrain. The README names this and the forms that work."""
    done = run([*TORCHRUN, "dvtrain", "eval", str(tmp_path)], tmp_path)
    assert done.returncode != 0 and f"can't open file '{tmp_path / 'dvtrain'}'" in done.stderr
    readme = (REPO / "README.md").read_text()
    assert "can't open file '.../dvtrain'" in readme and "torchrun --nproc_per_node 2 -m dvtrain eval RUN_DIR" in readme


@pytest.mark.slow
def test_each_launcher_form_gives_the_same_evaluation(vanilla_run, tmp_path):
    """`python -m dvtrain eval` (one process) and `torchrun` without --no-python (2 processes, from the top
    folder) write the same white-box rows (one thread per process: the same rounding)."""
    rows = {}
    for name, prefix in (("python -m", [sys.executable, "-m", "dvtrain"]), ("torchrun", [*TORCHRUN, "dvtrain"])):
        run_dir = tmp_path / name.replace(" ", "_") / "run"
        shutil.copytree(vanilla_run, run_dir)
        done = run([*prefix, "eval", str(run_dir), *SMALL], REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((run_dir / "results.json").read_text())
        rows[name] = sorted((r["model"], r["attack"], r["norm"], r["eps"], r["accuracy"])
                            for r in results["eval"] if r.get("table") == "eval")
        assert results["eval_provenance"]["world_size"] == (2 if name == "torchrun" else 1)
    assert rows["python -m"] and rows["python -m"] == rows["torchrun"]
