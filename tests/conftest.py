"""Shared fixtures: small real data files and short configurations."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# A fast digits run: every stage, a couple of epochs, a small evaluation, no W&B.
TINY = [
    "vanilla.epochs=2",
    "dverge.epochs=1",
    "dverge_advt.epochs=1",
    "dverge.batch_size=64",
    "dverge_advt.batch_size=64",
    "dverge.steps=2",
    "dverge_advt.steps=2",
    "dverge_advt.adv_steps=2",
    "data.train_limit=256",
    "eval.num_examples=64",
    "eval.steps=2",
    "logging.wandb=disabled",
    "logging.progress=false",
]


def write_cifar10(folder: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> Path:
    """Write CIFAR-10 in the `cifar-10-batches-py` layout: five training batches, a test batch and
    batches.meta, each a pickled dict with the keys and dtypes of the real files (3072 uint8 per row)."""
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int) -> None:
        entry = {
            "batch_label": name,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{name}_{k}.png" for k in range(n)],
        }
        with open(root / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for k in range(1, 6):
        batch(f"data_batch_{k}", per_batch)
    batch("test_batch", test)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072, "num_cases_per_batch": per_batch}, f, protocol=2)
    return folder


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path / "cifar")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python launch/train.py ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def one_thread():
    """Correctness, not speed: one torch thread keeps a test quick when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vanilla_run(tmp_path_factory) -> Path:
    """One finished vanilla stage of TINY (every file `dvtrain train` leaves: config, checkpoint, results,
    plots), trained once for the whole session: tests copy it before changing anything."""
    from dvtrain import cli

    run_dir = tmp_path_factory.mktemp("vanilla_run") / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]"]) == 0
    return run_dir


@pytest.fixture(scope="session")
def seed_runs(tmp_path_factory) -> dict[str, Path]:
    """Two experiments that differ only in the seed, in run directories seed0 and seed1 (no `name=`),
    vanilla only (long enough to learn, so the seeds' accuracies differ), each logged to an offline W&B run
    (seed 1 with its final checkpoint as a W&B artifact)."""
    from dvtrain import cli

    root = tmp_path_factory.mktemp("seeds")
    args = [o for o in TINY if not o.startswith("logging.wandb")] + [
        "stages=[vanilla]", "vanilla.epochs=4", "data.train_limit=512", "logging.wandb=offline"]
    runs = {f"seed{seed}": root / f"seed{seed}" for seed in (0, 1)}
    for seed, run_dir in enumerate(runs.values()):  # seed 1 also uploads its checkpoint as an artifact
        assert cli.train_main(["--run-dir", str(run_dir), *args, f"seed={seed}", f"logging.artifacts={bool(seed)}"]) == 0
    return runs


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 3, batch: int = 64):
    """A plain classifier fitted with Adam on (x, y), its own data order from `seed`, returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def ensemble():
    """Three of dvtrain's conv submodels (own init seeds) fitted to digits, and the digits data; one
    intra-op thread (these nets are tiny: several times faster than two on a busy 2-core machine)."""
    from dvtrain.config import Config, DataConfig
    from dvtrain.data import load_dataset
    from dvtrain.submodels import build_submodel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_dataset(DataConfig(name="digits"))
        return [fit(build_submodel(Config(), data, i), data.x_train, data.y_train, seed=i) for i in range(3)], data
    finally:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Files with the most `slow` tests first (stable otherwise): the default run spreads whole files over two
    xdist workers (pyproject's addopts), and a long file handed out last would leave one worker running it
    alone for minutes while the other idles."""
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])
