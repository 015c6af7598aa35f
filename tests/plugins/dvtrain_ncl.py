"""Negative correlation learning (Liu & Yao, Neural Networks 12(10), 1999) as a dvtrain stage, defined
outside dvtrain: the example of docs/write_a_stage.md and the plug-in the tests train.

Each submodel i minimises its cross-entropy minus λ times its predictions' spread from the ensemble's
mean, averaged over the batch:

    loss = Σ_i CE(f_i(x), y) − λ · mean_b Σ_i ‖p_i(x_b) − p̄(x_b)‖²      p_i = softmax(f_i),  p̄ = mean_i p_i

(the paper's penalty, on probabilities instead of regression outputs). The spread couples the
submodels on one batch: a process computes it from its own submodels' probabilities (with their
graph) and the others' (gathered as data), which gives each owned submodel the gradient of the whole
loss. This file is the whole method: the loop trains, shards, checkpoints and resumes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain.config import OptimConfig, StageConfig, ranged
from dvtrain.data import batches
from dvtrain.stages import StageSpec
from dvtrain.train.stage import Batch, Stage, StepFigures, StepResult


@dataclass
class NclConfig(StageConfig):
    """The `ncl` section: the frame's fields (epochs, batch_size, init_from, optim) and the method's own."""

    epochs: int = ranged(10, ge=0)
    batch_size: int = ranged(64, ge=1)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
    penalty: float = ranged(0.5, ge=0, note="λ, the weight of the spread from the ensemble's mean")


@dataclass
class Images(Batch):
    x: Tensor  # [B, C, H, W] pixels in [0, 1]
    y: Tensor  # [B]


class Ncl(Stage):
    name = "ncl"
    main_loss = "loss/clean"

    def batches(self, epoch: int) -> Iterator[Images]:
        """Every process draws the same batches from the shared stream (the penalty couples the submodels)."""
        run = self.run
        drawn = batches(run.data.x_train, run.data.y_train, run.section.batch_size, run.shared, run.augment_padding,
                        run.cfg.data.drop_last)
        return (Images(x, y) for x, y in drawn)

    def step(self, batch: Images) -> StepResult:
        run = self.run
        logits = []
        for model in run.models:
            model.train()
            logits.append(model(batch.x))
        own = torch.stack(logits)  # [n_own, B, K]
        ce = torch.stack([F.cross_entropy(out, batch.y) for out in logits])
        probs = own.softmax(dim=-1)
        every = run.placement.all_gather(probs.detach())  # [M, B, K], the others' as data
        ids = run.placement.owned  # contiguous
        probs = torch.cat([every[: ids[0]], probs, every[ids[-1] + 1:]])
        spread = (probs - probs.mean(dim=0)).pow(2).sum(dim=-1).sum(dim=0).mean()
        loss = ce.sum() - run.section.penalty * spread
        return StepResult(loss, StepFigures({"loss/clean": ce.detach()}, own.detach(), batch.y,
                                            ensemble={"loss/spread": spread.detach()}))


# What the entry point `ncl = dvtrain_ncl:STAGE` (group dvtrain.stages) names.
STAGE = StageSpec("ncl", NclConfig, Ncl, distils=False, source="dvtrain_ncl")
