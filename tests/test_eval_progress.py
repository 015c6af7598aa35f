"""`dvtrain eval` shows a progress bar per long phase (issue 22 item 2): each white-box attack on each
model, surrogate training (the stage loop's epoch bars), each example set's crafting, the transfer
matrix, the black-box table, the ε sweep, the checks and the diversity matrix; their seconds land in
results.json's eval_provenance.phase_s. DVTRAIN_PROGRESS=1 shows the bars off a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from dvtrain import cli
from dvtrain.eval.report import load_results

REPO = Path(__file__).resolve().parent.parent
SMALL = ["eval.transfer.num_images=20", "eval.transfer.steps=1", "eval.transfer.restarts=1",
         "eval.transfer.blackbox_steps=1", "eval.transfer.blackbox_restarts=1", "eval.transfer.surrogate_sizes=[2]",
         "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.05]", "eval.full_attacks=[clean,pgd_linf]",
         "eval.transfer.blackbox_attacks=[mi_pgd]", "eval.transfer.blackbox_losses=[ce]",
         "eval.checks.long_steps=2", "eval.diversity.num_images=20", "eval.num_examples=20"]


@pytest.mark.slow
def test_each_phase_of_dvtrain_eval_prints_a_progress_line_and_its_seconds(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]", "logging.progress=true"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DVTRAIN_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvtrain.cli", "eval", str(run_dir), *SMALL], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    phases = load_results(run_dir)["eval_provenance"]["phase_s"]
    expected = ["vanilla sub0 pgd_linf Linf ε=0.1", "vanilla mixture pgd_linf Linf ε=0.1", "surrogate ensemble of 2",
                "transferability matrices", "vanilla black-box transfer", "accuracy vs ε",
                "gradient-masking checks", "vulnerability-diversity matrices"]
    for name in expected:
        assert name in phases and phases[name] >= 0, (name, sorted(phases))
        # a tqdm line with the phase's name; image-counting phases show a rate in images/s
        lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith(name)]
        assert lines, (name, done.stderr[-3000:])
    assert any(name.startswith("crafting ") for name in phases), sorted(phases)
    assert "img/s" in done.stderr
    assert "vanilla 1/1" in done.stderr  # the surrogate's own epoch bar (the stage loop's)
    # Issue 29, item 1: one line per table, no surrogate's table, a closing block with the headline and the files.
    out = done.stdout
    assert "### vanilla" not in out and "[vanilla 1/1]" not in out, out[-3000:]
    for table in ("eval", "transfer", "blackbox", "eps_sweep", "diversity", "checks"):
        assert sum(line.startswith(f"[eval] {table} table: ") for line in out.splitlines()) == 1, (table, out[-3000:])
    # The black-box phase counts each image once per example set: said so, not as that many images.
    scored = [line for line in out.splitlines() if line.startswith("[eval] vanilla black-box transfer: ")]
    assert scored and all(re.search(r", \d+ scorings \(\d+ images × \d+ example sets\)$", line) for line in scored), scored
    closing = out[out.index("[eval] done: vanilla"):].splitlines()
    assert any(line.split() [:5] == ["Worst", "case", "L∞", "ε=0.1", "(%)"] and "n=20" in line for line in closing), closing
    assert any(line.strip() == f"every table, its budgets and checks: {run_dir / 'results.md'}" for line in closing), closing
    summary = (run_dir / "results.md").read_text()
    assert summary.index("## Summary") < summary.index("### vanilla")
    assert "[vanilla_loss](plots/vanilla_loss.png)" in summary  # every figure linked, training's loss curves too
