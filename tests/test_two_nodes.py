"""A two-node launch, both "nodes" on this machine: 2 processes each, one submodel per process,
gives weights bit-identical to one process (the recipe of configs/accelerate/2nodes_8gpu.yaml and
docs/distributed.md, on CPUs with gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO

SIZE = 4
TINY = [
    "stages=[vanilla, dverge]", f"ensemble.size={SIZE}", "vanilla.epochs=1", "dverge.epochs=1", "dverge.steps=2",
    "vanilla.batch_size=32", "dverge.batch_size=32", "data.train_limit=128", "eval.num_examples=16", "eval.steps=1",
    "logging.wandb=disabled", "logging.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
TRAIN = str(REPO / "launch" / "train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_dir, stage: str) -> list[dict]:
    return [load_file(run_dir / "checkpoints" / stage / f"sub{i}.safetensors") for i in range(SIZE)]


@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_process(tmp_path):
    one = subprocess.run([sys.executable, TRAIN, "--run-dir", str(tmp_path / "one"), *TINY],
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--num_processes", str(SIZE), TRAIN, "--run-dir", str(tmp_path / "two"), *TINY],
            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].count("### dverge") == 1 and "### dverge" not in outputs[1][0]  # rank 0 reports
    for stage in ("vanilla", "dverge"):
        for a, b in zip(_weights(tmp_path / "one", stage), _weights(tmp_path / "two", stage)):
            assert all(a[k].equal(b[k]) for k in a), stage
