"""How the processes of `dvtrain eval` share its work, with the same numbers for any number of processes.

One kind of sharing, deterministic: independent tasks (one chunk of the white-box table's images under
one attack, a surrogate ensemble to train, an example set to craft, one (model, attack, ε) cell of the ε
sweep, one source submodel's transfer run, one row of a diversity matrix, one stage's masking probe),
each with a cost; `shared_map` gives each task to one rank, longest first to the least-loaded rank, and
gathers the results. An evaluation table hands its work over as `Tasks` (`dvtrain.eval.tables`). This is
the only module of evaluation that gathers between processes.

Each task draws its random numbers from a stream named after the task itself (`dvtrain.rng.stream`),
never after the rank, so which process computed it changes nothing: at equal thread counts the results
are bit-identical to one process's.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, Protocol, TypeVar

import torch
from tqdm import tqdm

from dvtrain.errors import DvtrainError
from dvtrain.eval.progress import Phases

T = TypeVar("T")
R = TypeVar("R")


class Share(Protocol):
    """The processes of one `dvtrain eval`: this one's rank, their number, and an all-gather."""

    rank: int
    world: int

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj` (picklable), in rank order, on every rank. Every rank must call it."""


TIMEOUT_SIGNS = ("Timed out waiting", "timed out")  # how gloo says a collective's timeout passed


class ProcessGroupShare:
    """The processes of the default torch.distributed process group, gathering over a gloo group of their
    own whose timeout is `timeout_s` (eval.task_timeout_s): a rank that finished its tasks waits in the
    gather for the slowest one, which may be training a surrogate ensemble for hours, far beyond the
    default group's dist.timeout_s. The group is made at the first gather (new_group is collective, and
    every rank gathers alike), so a refusal before any work involves no collective."""

    def __init__(self, timeout_s: float) -> None:
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.timeout_s = timeout_s
        self.group = None

    def gather(self, obj: object) -> list[object]:
        """Raises DvtrainError naming eval.task_timeout_s when another rank did not reach the gather within
        it (gloo's "Timed out waiting"): a slow rank, not a lost one, so the fix is the setting."""
        if self.group is None:
            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        out: list[object] = [None] * self.world
        try:
            torch.distributed.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            if not any(sign in str(exc) for sign in TIMEOUT_SIGNS):
                raise
            raise DvtrainError(
                f"rank {self.rank} waited eval.task_timeout_s={self.timeout_s:g} s for the other processes' share of "
                "the evaluation and gave up (a rank training a surrogate ensemble can take hours); pass a larger "
                "eval.task_timeout_s") from None
        return out


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each task: longest processing time first, each to the rank with the least work so far
    (ties: the lower rank, then the earlier task), so the assignment is a function of `costs` and `world`
    (Graham, 1969: the largest load is within 4/3 of the best). Costs are any consistent unit (e.g.
    forward-backward passes); every rank must compute the same ones, so they come from the config or
    from rank 0 (`from_main`), never from a rank's own forward passes."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[k] = rank
        load[rank] += costs[k]
    return owner


def shared_map(share: Share | None, tasks: Sequence[T], costs: Sequence[float], run: Callable[[T], R],
               bar: tqdm | None = None, images: Sequence[int] | None = None) -> list[R]:
    """[run(task) for task in tasks] on every rank, each task run by the one rank `assign` gives it.

    `run` must not depend on the rank (its random numbers come from the task), and its results must be
    picklable (keep them small: masks, floats; large artifacts go through a shared cache on disk, with
    `run` returning None). Every rank must call this with the same tasks and costs. One process
    (`share` None) runs every task in order. `bar` (a progress bar) counts this rank's tasks' `images`
    (one number per task) as they finish, so its rate and ETA are this rank's."""
    world = 1 if share is None else share.world
    owners = assign(costs, world)
    rank = 0 if share is None else share.rank
    mine_k = [k for k, owner in enumerate(owners) if owner == rank]
    if bar is not None and images is not None:
        bar.reset(total=sum(images[k] for k in mine_k))
    mine: dict[int, R] = {}
    for k in mine_k:
        mine[k] = run(tasks[k])
        if bar is not None and images is not None:
            bar.update(images[k])
    if share is None or world == 1:
        return [mine[k] for k in range(len(tasks))]
    merged: dict[int, R] = {}
    for part in share.gather(mine):
        merged.update(part)  # type: ignore[arg-type]
    return [merged[k] for k in range(len(tasks))]


@dataclass
class Tasks(Generic[T, R]):
    """One batch of shareable work: `items` (every rank builds the same list), `costs` (one per item, in any
    consistent unit, from the config or rank 0 only: `assign`), `run` (item → a small picklable result,
    independent of the rank), `images` (per item, what a progress bar counts; None: a bar of time only)
    and `label`, the progress phase it is timed as (None: `run` times its own phases)."""

    items: list[T]
    costs: list[float]
    run: Callable[[T], R]
    images: list[int] | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if len(self.costs) != len(self.items) or (self.images is not None and len(self.images) != len(self.items)):
            raise ValueError(f"{len(self.items)} tasks need as many costs and image counts, got {len(self.costs)} "
                             f"and {None if self.images is None else len(self.images)}")

    def map(self, share: Share | None, bar: tqdm | None = None) -> list[R]:
        """`shared_map` of this batch: [run(item) for item in items] on every rank."""
        return shared_map(share, self.items, self.costs, self.run, bar, self.images)


def run_work(work: Generator[Tasks, list, R], share: Share | None, phases: Phases | None = None) -> R:
    """Drive `work`, a generator that yields `Tasks` and is sent each batch's results (`Tasks.map`, in item
    order, on every rank), to its end; returns its return value. A batch with a label is timed as that
    phase of `phases` with a bar over its images. Every rank must drive the same work."""
    try:
        tasks = next(work)
        while True:
            if tasks.label is None or phases is None:
                done = tasks.map(share)
            else:
                with phases.phase(tasks.label, None if tasks.images is None else sum(tasks.images)) as bar:
                    done = tasks.map(share, bar)
            tasks = work.send(done)
    except StopIteration as stop:
        return stop.value


def from_main(share: Share | None, value: T) -> T:
    """Rank 0's `value` on every rank (one process: `value`): for decisions that must agree, such as which
    cached items exist when a concurrent evaluation may be adding them."""
    return value if share is None or share.world == 1 else share.gather(value)[0]  # type: ignore[return-value]


def run_for_effect(run: Callable[[T], object]) -> Callable[[T], None]:
    """`run` with its result dropped: for tasks whose product goes to the shared cache on disk, so that
    `shared_map` gathers nothing large."""
    def wrapped(task: T) -> None:
        run(task)

    return wrapped


def is_main(share: Share | None) -> bool:
    """Whether this process writes results (rank 0, or the only process)."""
    return share is None or share.rank == 0
