"""Data-parallel replicas: more ranks than submodels, each submodel trained by an owner group of ranks.

With W = R·N ranks for N submodels, every batch is split by rows among a submodel's R replicas. Each
replica computes the step on its rows; before its optimizer steps, the part-batch gradients are summed
over the owner group, each weighted by its share of the rows, which gives the full-batch gradient. The
stage loop applies this (`attach`, `sum`); a stage only asks for its rows (`shard`).

torch's `DistributedDataParallel` does not serve here: it synchronises gradients through hooks armed by
its own `forward`, one forward per backward, and averages replicas with equal weights; a DVERGE step
feeds one backward from several forwards (one per other submodel's distilled batch, the clean and the
adversarial batch), the grouped engine computes through joined copies of the parameters, and a batch's
last rows may split unevenly. A pre-step hook on each optimizer does the same reduction for all of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dvtrain.errors import DvtrainError


class Replicas:
    """Replica `index` of `count` in the owner group `group` (count 1: no replicas, every method is the identity)."""

    def __init__(self, count: int = 1, index: int = 0, group=None) -> None:
        self.count, self.index, self.group = count, index, group
        self.share = 1.0  # this replica's share of the rows of the last batch it was handed

    def shard(self, *batch: Tensor) -> tuple[Tensor, ...]:
        """This replica's rows of tensors that share their first (batch) dimension B."""
        n = len(batch[0])
        bounds = [n * q // self.count for q in range(self.count + 1)]
        rows = slice(bounds[self.index], bounds[self.index + 1])
        self.share = (rows.stop - rows.start) / n
        return tuple(t[rows] for t in batch)

    def sum(self, values: Tensor, share: float | Tensor | None = None) -> Tensor:
        """Σ over the owner group of share × values: full-batch means from part-batch means. `share`
        defaults to this replica's share of the last batch `shard` split (a tensor: one per row of values)."""
        if self.count == 1:
            return values
        values = values * (self.share if share is None else share)
        dist.all_reduce(values, group=self.group)
        return values

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Sum the replicas' weighted gradients (one collective per optimizer) before every step."""
        if self.count == 1:
            return

        def reduce_gradients(opt: torch.optim.Optimizer, args, kwargs) -> None:
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))

        optimizer.register_step_pre_hook(reduce_gradients)

    def check_batches(self, num_rows: int, batch_size: int, key: str, drop_last: bool = False) -> None:
        """Refuse, before any work, batches that would leave a replica without rows.

        Raises:
            DvtrainError: the batch size or the last partial batch is smaller than the replica count.
        """
        if self.count == 1:
            return
        last = batch_size if drop_last else num_rows % batch_size or batch_size
        smallest = min(batch_size, last, num_rows)
        if smallest < self.count:
            raise DvtrainError(
                f"{key}={batch_size} with {num_rows} training images gives a batch of {smallest} row(s), "
                f"fewer than the {self.count} replicas of each submodel; pick a {key} whose batches "
                f"(the last one included) have at least {self.count} rows, or launch fewer processes"
            )
