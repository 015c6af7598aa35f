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
LAUNCH_TIMEOUT_S = 360


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_dir, stage: str) -> list[dict]:
    return [load_file(run_dir / "checkpoints" / stage / f"sub{i}.safetensors") for i in range(SIZE)]


@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_process(tmp_path):
    one = subprocess.run([sys.executable, TRAIN, "--run-dir", str(tmp_path / "one"), *TINY],
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    # Each node writes to its own files, not a pipe: a pipe read only after the other node ends could fill and
    # stall that node's workers, and the first node's launcher waits for every node at its exit barrier.
    logs = [(tmp_path / f"node{rank}.out", tmp_path / f"node{rank}.err") for rank in (0, 1)]
    nodes = []
    for rank, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                 "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 "--num_processes", str(SIZE), TRAIN, "--run-dir", str(tmp_path / "two"), *TINY],
                env=ENV, cwd=REPO, stdout=stdout, stderr=stderr,
            ))
    try:
        # 4 processes on 2 cores beside another test worker: ~20 s idle, minutes under load; a hang still fails.
        for node in nodes:
            node.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- {path.name}\n{path.read_text()[-2000:]}" for pair in logs for path in pair)
        pytest.fail(f"the two-node launch did not end within {LAUNCH_TIMEOUT_S} s:\n{tails}")
    finally:
        for node in nodes:
            node.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].count("### dverge") == 1 and "### dverge" not in outputs[1][0]  # rank 0 reports
    for stage in ("vanilla", "dverge"):
        for a, b in zip(_weights(tmp_path / "one", stage), _weights(tmp_path / "two", stage)):
            assert all(a[k].equal(b[k]) for k in a), stage
