"""Placement: which process owns which submodel, and how per-submodel tensors reach everyone.

This is the one interface between the DVERGE algorithm and the hardware. The algorithm trains the
submodels in `owned` and obtains everyone's per-submodel tensors with `all_gather`, which turns a
tensor stacked over the owned submodels into one stacked over all of them, in submodel order.
Distilled batches enter the other submodels' losses as data, so that gather carries no gradient.

The white-box attack on the mixture is the one place where gradients must cross processes: the
mixture's loss needs every submodel's output, and its input gradient is the sum of every submodel's
contribution. `share_input` and `gather_outputs` are the two differentiable halves of that.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor

from dvtrain.distributed.replicas import Replicas


class Placement(Protocol):
    size: int  # number of submodels in the ensemble
    owned: list[int]  # the submodels this process trains, ascending
    is_main: bool  # the process that logs and writes shared files

    def all_gather(self, owned_values: Tensor) -> Tensor:
        """[len(owned), ...] on each process → [size, ...] on every process, in submodel order; no gradient."""
        ...

    def gather_outputs(self, owned_values: Tensor) -> Tensor:
        """Like `all_gather`, but gradients flow back to the owned entries."""
        ...

    def share_input(self, x: Tensor) -> Tensor:
        """x unchanged; in the backward pass its gradient is summed over the processes."""
        ...

    writes_checkpoint: bool  # whether this process writes its owned submodels' checkpoint files
    replicas: Replicas  # this process's place among its submodels' data-parallel replicas

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any: lets all ranks agree to stop at one step."""
        ...

    def barrier(self) -> None:
        """Wait for every process (checkpoint files are swapped in only when all are written)."""
        ...


class LocalPlacement:
    """One process owns every submodel: gathering and sharing are the identity."""

    def __init__(self, size: int):
        self.size = size
        self.owned = list(range(size))
        self.is_main = True
        self.replicas = Replicas()

    def all_gather(self, owned_values: Tensor) -> Tensor:
        return owned_values

    def gather_outputs(self, owned_values: Tensor) -> Tensor:
        return owned_values

    def share_input(self, x: Tensor) -> Tensor:
        return x

    writes_checkpoint = True

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass


def owned_by(rank: int, world: int, size: int) -> list[int]:
    """Contiguous blocks: with 3 submodels on 2 ranks, rank 0 owns [0] and rank 1 owns [1, 2]."""
    return list(range(rank * size // world, (rank + 1) * size // world))


class ProcessGroupPlacement:
    """Submodels spread over the ranks of the default process group.

    With at most as many ranks as submodels, each submodel is owned by exactly one rank; ranks may
    own different numbers of submodels, so each pads its stack to the largest share before the
    collective and the padding is dropped on the way out.

    With more ranks than submodels (a multiple of them), each submodel has an owner group of
    `replicas` ranks that split every batch by rows: replica q of every submodel works on the same
    rows, so the "row group" of the q-th replicas exchanges distilled batches exactly as an
    unreplicated launch does, and gradients are summed inside each owner group (each weighted by
    its share of the batch), which gives the full-batch gradient.
    """

    def __init__(self, size: int, rank: int, world: int, device: torch.device):
        self.size, self.rank, self.world, self.device = size, rank, world, device
        self.is_main = rank == 0
        if world <= size:
            self.replicas_per_submodel, self.replica = 1, 0
            self.owned = owned_by(rank, world, size)
            self.share = max(len(owned_by(r, world, size)) for r in range(world))
            # row of submodel i in the [world × share] gathered stack
            self.rows = [r * self.share + k for r in range(world) for k in range(len(owned_by(r, world, size)))]
            self.row_group = None  # the default group; no replicas
            self.replicas = Replicas()
            return
        if world % size:
            raise ValueError(f"{world} ranks for {size} submodels: not a multiple")
        self.replicas_per_submodel = world // size
        owner, self.replica = divmod(rank, self.replicas_per_submodel)
        self.owned, self.share, self.rows = [owner], 1, list(range(size))
        # Every rank must create every group, in the same order.
        per = self.replicas_per_submodel
        row_groups = [dist.new_group([g * per + q for g in range(size)]) for q in range(per)]
        owner_groups = [dist.new_group(list(range(g * per, (g + 1) * per))) for g in range(size)]
        self.row_group = row_groups[self.replica]
        self.replicas = Replicas(self.replicas_per_submodel, self.replica, owner_groups[owner])

    @property
    def writes_checkpoint(self) -> bool:
        """One replica of each submodel writes its files."""
        return self.replica == 0

    def all_gather(self, owned_values: Tensor) -> Tensor:
        padded = owned_values.new_zeros((self.share, *owned_values.shape[1:]))
        padded[: len(self.owned)] = owned_values
        parts = [torch.empty_like(padded) for _ in range(self.world // self.replicas_per_submodel)]
        dist.all_gather(parts, padded.contiguous(), group=self.row_group)
        stacked = rearrange(torch.stack(parts), "rank share ... -> (rank share) ...")
        return stacked[self.rows]

    def gather_outputs(self, owned_values: Tensor) -> Tensor:
        return _GatherOutputs.apply(owned_values, self)

    def share_input(self, x: Tensor) -> Tensor:
        return _ShareInput.apply(x, self.row_group)

    def any(self, flag: bool) -> bool:
        vote = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item())

    def barrier(self) -> None:
        dist.barrier()


class _GatherOutputs(torch.autograd.Function):
    """Every rank computes the same loss from the gathered outputs, so the gradient of the owned
    entries is simply their slice of the incoming gradient: no reduction here."""

    @staticmethod
    def forward(ctx, owned_values: Tensor, placement: ProcessGroupPlacement) -> Tensor:
        ctx.placement = placement
        return placement.all_gather(owned_values.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):
        first = ctx.placement.owned[0]
        return grad[first : first + len(ctx.placement.owned)], None


class _ShareInput(torch.autograd.Function):
    """Identity forward; the backward sums the per-rank partial gradients of the shared input over
    the ranks that hold one copy of each submodel."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
