"""Sharing `dvtrain eval`'s tasks over processes (dvtrain.eval.share): which rank runs which task is a
function of the tasks' costs and the number of processes alone, every task runs exactly once, the load
is balanced, and one process runs everything in order. (That the results are bit-identical for 1, 2
and 3 processes is tests/test_eval_distributed.py's, with real torchrun processes.)"""

from __future__ import annotations

import itertools
import random

from dvtrain.eval.share import assign, shared_map


def test_every_task_goes_to_one_rank_the_same_way_every_time():
    costs = [8, 5, 3, 3, 1, 1, 1, 0.5]
    for world in (1, 2, 3, 5):
        owners = assign(costs, world)
        assert owners == assign(list(costs), world)  # a function of the costs and the world size
        assert len(owners) == len(costs) and set(owners) <= set(range(world))
    assert assign([3, 5, 8], 2) == [1, 1, 0]  # the ensemble of 8 alone, 5 + 3 on the other rank
    assert assign([1, 1, 1, 1], 2) == [0, 1, 0, 1]  # equal costs: round robin, lower rank first


def makespan(costs: list[int], owners: list[int], world: int) -> int:
    loads = [0] * world
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return max(loads)


def test_the_largest_load_is_within_grahams_bound_of_the_best():
    """Longest-processing-time first: makespan ≤ (4/3 − 1/(3m))·optimum (Graham, 1969), the optimum found
    by trying every assignment of small random instances."""
    rng = random.Random(0)
    for _ in range(60):
        costs = [rng.randint(1, 20) for _ in range(rng.randint(1, 7))]
        world = rng.randint(2, 3)
        best = min(makespan(costs, list(owners), world) for owners in itertools.product(range(world), repeat=len(costs)))
        assert makespan(costs, assign(costs, world), world) <= (4 / 3 - 1 / (3 * world)) * best + 1e-9


class Bar:
    def __init__(self) -> None:
        self.total, self.n = None, 0

    def reset(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self, k: int) -> None:
        self.n += k


def test_one_process_runs_every_task_in_order_and_counts_its_images():
    seen = []
    bar = Bar()
    out = shared_map(None, ["a", "b", "c"], [1, 9, 5], lambda t: seen.append(t) or t.upper(), bar, [10, 20, 30])
    assert out == ["A", "B", "C"] and seen == ["a", "b", "c"]
    assert bar.total == 60 and bar.n == 60


def _gather_late(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 reaches the gather 4 s after rank 0, whose share waits 1 s: what rank 0 reports."""
    import time
    from pathlib import Path

    import torch.distributed as dist

    from dvtrain.errors import DvtrainError
    from dvtrain.eval.share import ProcessGroupShare

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    share = ProcessGroupShare(timeout_s=1.0)
    share.gather("ready")  # both ranks present: the group exists and works
    if rank == 1:
        time.sleep(4)
    try:
        share.gather(rank)
        outcome = "gathered"
    except DvtrainError as exc:
        outcome = f"DvtrainError: {exc}"
    except RuntimeError as exc:
        outcome = f"RuntimeError: {exc}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)


def test_a_rank_that_waits_past_eval_task_timeout_s_names_that_setting(tmp_path):
    """Issue 28, kind 7: a too-small eval.task_timeout_s is a timeout that names the setting, not "lost a peer"."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_gather_late, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    except mp.ProcessExitedException:  # gloo aborts a process that exits after a timed-out collective
        pass
    waited = (tmp_path / "rank0.txt").read_text()
    assert waited.startswith("DvtrainError: rank 0 waited eval.task_timeout_s=1 s"), waited
    assert "pass a larger eval.task_timeout_s" in waited
