"""The frame around a stage's step, owned by the stage loop: a replica's rows, the optimizer update,
and CUDA-graph replay. A stage computes its loss; what happens to the weights with it is here, once.
"""

from __future__ import annotations

from collections.abc import Iterator

from dvtrain.compute import CapturedStep
from dvtrain.distributed.placement import Placement
from dvtrain.submodels import Owned
from dvtrain.timing import DISABLED, PhaseTimer
from dvtrain.train.stage import Batch, Stage, StepFigures, StepResult


def update(owned: Owned, placement: Placement, result: StepResult, timer: PhaseTimer = DISABLED) -> StepFigures:
    """Apply a step's loss to the owned submodels: zero their gradients, backpropagate the loss once and
    step every owned optimizer (in submodel order; data-parallel replicas sum their gradients in the
    optimizers' pre-step hooks, `dvtrain.distributed.replicas`). Returns the step's figures."""
    with timer("train"):
        for i in placement.owned:
            owned.optimizers[i].zero_grad(set_to_none=True)
        result.loss.backward()  # each submodel's weights receive exactly the gradient of its own loss
        for i in placement.owned:
            owned.optimizers[i].step()
    return result.figures


def resumed(batches: Iterator[Batch], skip: int) -> Iterator[tuple[int, Batch]]:
    """(step, batch) from step `skip` on: the steps before are drawn, so every random stream the stage
    draws from advances exactly as in an uninterrupted epoch, and passed over."""
    for step, batch in enumerate(batches):
        if step >= skip:
            yield step, batch


class StepRunner:
    """Runs one stage's steps: shards each batch for this process's replica, then the stage's loss and
    `update`; with `compute.cuda_graphs`, whole steps are replayed from CUDA graphs where the stage allows."""

    def __init__(self, stage: Stage, owned: Owned, placement: Placement, cuda_graphs: bool, timer: PhaseTimer) -> None:
        self.stage, self.owned, self.placement, self.timer = stage, owned, placement, timer
        self.captured = CapturedStep(stage.before_eager) if cuda_graphs else None
        self.capturable_set = False

    def __call__(self, batch: Batch) -> tuple[StepFigures, int]:
        """The step's figures and the number of images it trained on (the whole batch's)."""
        rows = batch.row_tensors()
        full_rows = len(rows[0])
        batch = batch.with_rows(list(self.placement.replicas.shard(*rows)))
        batch.full_rows = full_rows
        key = self.stage.graph_key(batch) if self.captured is not None else None
        if key is None:
            return self.train(batch), full_rows
        if not self.capturable_set:  # Adam keeps its step count on the GPU to be captured (SGD needs none)
            for i in self.placement.owned:
                for group in self.owned.optimizers[i].param_groups:
                    if "capturable" in group:
                        group["capturable"] = True
            self.capturable_set = True
        return self.captured(key, lambda *t: self.train(batch.with_rows(list(t))), *batch.row_tensors()), full_rows

    def train(self, batch: Batch) -> StepFigures:
        return update(self.owned, self.placement, self.stage.step(batch), self.timer)
