"""A stage defined outside dvtrain (tests/plugins/dvtrain_ncl.py, negative correlation learning) is a
stage like the built-in ones: it is found through its package's entry point (group dvtrain.stages),
takes its own YAML section, trains, resumes after kill -9 bit for bit, gives the same weights under 3
processes as under 1, and shows in `dvtrain eval` and `dvtrain compare`. Nothing in dvtrain/ names it.

tests/plugins/ is laid out as an installed package: the module and its `dvtrain_ncl-1.0.dist-info`
(METADATA, entry_points.txt), so putting the folder on a process's path is what `pip install` does.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO

PLUGINS = REPO / "tests" / "plugins"
CONFIG = str(PLUGINS / "ncl.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
QUICK = ["ncl.epochs=3", "eval.num_examples=60", "eval.steps=2",
         "logging.wandb=disabled", "logging.progress=false"]
DVTRAIN = [sys.executable, "-c", "import sys; from dvtrain.cli import main; sys.exit(main())"]
TRAIN = [sys.executable, str(REPO / "launch" / "train.py")]


def run(cmd: list[str], timeout: int = 300, env: dict = ENV) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def weights(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints" / "ncl"
    return {f.name: load_file(f) for f in sorted(folder.glob("sub?.safetensors"))}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        for key in a[name]:
            assert a[name][key].equal(b[name][key]), (name, key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ncl") / "run"
    done = run([*TRAIN, "--config", CONFIG, "--run-dir", str(run_dir), *QUICK])
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_the_entry_point_registers_the_stage_and_its_section(tmp_path):
    probe = ("from dvtrain import stages; from dvtrain.config import load_config; "
             f"cfg = load_config({CONFIG!r}, ['ncl.penalty=0.25']); "
             "print(stages.names(), type(cfg.section('ncl')).__name__, cfg.ncl.penalty, cfg.ncl.epochs)")
    done = run([sys.executable, "-c", probe])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["('vanilla',", "'adp',", "'gal',", "'trs',", "'dverge',", "'dverge_advt',", "'ncl')",
                                   "NclConfig", "0.25", "4"]
    # its section's ranges are checked like a built-in one's, and a typo is answered with the right key
    bad = run([*DVTRAIN, "train", "--config", CONFIG, "--run-dir", str(tmp_path / "r"), "ncl.penalty=-1"])
    assert bad.returncode == 2 and bad.stderr.strip() == "dvtrain: error: ncl.penalty=-1.0 must be >= 0 (λ, the weight of the spread from the ensemble's mean)"
    typo = run([*DVTRAIN, "train", "--config", CONFIG, "--run-dir", str(tmp_path / "r"), "ncl.penalt=1"])
    assert typo.returncode == 2 and "did you mean 'ncl.penalty'?" in typo.stderr
    # without the package, its section is unknown, and the message says what registers one
    without = run([*DVTRAIN, "train", "--config", CONFIG, "--run-dir", str(tmp_path / "r")],
                  env={**ENV, "PYTHONPATH": str(REPO)})
    assert without.returncode == 2 and "unknown config key 'ncl'" in without.stderr
    assert "entry point group dvtrain.stages" in without.stderr and not (tmp_path / "r").exists()


def test_an_explicit_register_call_adds_a_stage_and_refuses_a_taken_name():
    probe = ("from dvtrain import stages; from dvtrain.config import Config, StageConfig; "
             "spec = stages.StageSpec('mine', StageConfig, 'my_package:Mine'); stages.register(spec); stages.register(spec); "
             "print('mine' in Config().sections, stages.distils('mine'));\n"
             "try: stages.register(stages.StageSpec('dverge', StageConfig, 'x:Y'))\n"
             "except stages.StageRegistryError as exc: print(exc)")
    done = run([sys.executable, "-c", probe], env={**ENV, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True False", "stage 'dverge' is registered twice (dvtrain and dvtrain); rename one of them"]


@pytest.mark.slow
def test_the_plugin_stage_trains_and_is_evaluated(straight):
    results = json.loads((straight / "results.json").read_text())
    clean = {r["model"]: r["accuracy"] for r in results["eval"] if r["stage"] == "ncl" and r["attack"] == "clean"}
    assert set(clean) == {"sub0", "sub1", "sub2", "mixture"} and clean["mixture"] > 50  # it learned
    history = [json.loads(line) for line in (straight / "wandb" / "ncl-history.jsonl").read_text().splitlines()]
    assert any("train/loss/spread" in entry["row"] for entry in history) and (straight / "plots" / "ncl_loss.png").exists()


@pytest.mark.slow
def test_the_plugin_stage_resumes_after_kill_9_bit_identically(straight, tmp_path):
    run_dir = tmp_path / "cut"
    cmd = [*TRAIN, "--config", CONFIG, "--run-dir", str(run_dir), *QUICK, "checkpoint.every_steps=2"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = run_dir / "checkpoints" / "ncl" / "state.json"
    deadline = time.monotonic() + 120
    try:
        while not (state.exists() and json.loads(state.read_text() or "{}").get("epoch", 0) >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    resumed = run([*TRAIN, "--run-dir", str(run_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(weights(straight), weights(run_dir))


@pytest.mark.slow
def test_the_plugin_stage_gives_the_same_weights_under_3_processes(straight, tmp_path):
    run_dir = tmp_path / "w3"
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", *TRAIN[1:],
                "--config", CONFIG, "--run-dir", str(run_dir), *QUICK])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_identical(weights(straight), weights(run_dir))


@pytest.mark.slow
def test_the_plugin_stage_shows_in_dvtrain_eval_and_compare(straight, tmp_path):
    small = ["eval.transfer.num_images=30", "eval.transfer.steps=2", "eval.transfer.restarts=1",
             "eval.transfer.blackbox_steps=2", "eval.transfer.blackbox_restarts=1",
             "eval.transfer.surrogate_sizes=[2]", "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.05]",
             "eval.autoattack.version=custom", "eval.autoattack.attacks=[apgd-ce]", "eval.autoattack.iterations=2",
             "eval.adaptive.steps=2", "eval.checks.long_steps=3", "eval.diversity.num_images=20"]
    done = run([*DVTRAIN, "eval", str(straight), *small], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((straight / "results.json").read_text())
    assert {r["attack"] for r in results["eval"] if r["stage"] == "ncl" and r["table"] == "eval"} >= {"autoattack", "adaptive"}
    assert "ncl" in results["transfer"] and "ncl" in results["diversity"]
    csv = tmp_path / "compare.csv"
    compared = run([*DVTRAIN, "compare", str(straight), str(straight), "--csv", str(csv)])
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "ncl" in compared.stdout and "ncl" in csv.read_text()
