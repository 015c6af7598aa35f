"""The Python API behaves like the CLI: `dvtrain.load_mixture` / `load_submodels` set torch's CPU
threads to the run's compute.threads, unless the user chose a count with OMP_NUM_THREADS."""

from __future__ import annotations

import pytest
import torch

import dvtrain
from conftest import TINY
from dvtrain import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api") / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]", "vanilla.epochs=1"]) == 0
    return run_dir


@pytest.fixture
def threads():
    """Restore the test process's torch threads afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load", [dvtrain.load_mixture, dvtrain.load_submodels])
def test_loading_applies_the_runs_thread_count(run, threads, monkeypatch, load):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)  # torch's default on a 2-core machine
    load(run, "vanilla")
    assert torch.get_num_threads() == 1  # the run's compute.threads (the default)


def test_omp_num_threads_is_the_users_choice(run, threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    dvtrain.load_mixture(run, "vanilla")
    assert torch.get_num_threads() == 2
