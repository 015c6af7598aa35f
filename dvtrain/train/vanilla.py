"""The `vanilla` stage: independent pretraining of the submodels on clean data.

Each submodel draws its own data order (and augmentation) from its own stream, so the submodels are
independently trained classifiers, and the result does not depend on which process trains which.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain.data import batches, num_batches
from dvtrain.train.stage import Batch, Stage, StepFigures, StepResult


@dataclass
class OwnBatches(Batch):
    """One batch per owned submodel, each from its own stream: xs[k] [B, C, H, W], ys[k] [B]."""

    xs: list[Tensor]
    ys: list[Tensor]


class Vanilla(Stage):
    """Each owned submodel minimises CE(f_i(x), y) on its own batches (plain classifiers)."""

    name = "vanilla"
    main_loss = "loss/clean"

    def batches(self, epoch: int) -> Iterator[OwnBatches]:
        run, cfg = self.run, self.run.section
        streams = [
            batches(run.data.x_train, run.data.y_train, cfg.batch_size, run.owned.data_generators[i], run.augment_padding,
                    run.cfg.data.drop_last)
            for i in run.placement.owned
        ]
        for _ in range(num_batches(len(run.data.y_train), cfg.batch_size, run.cfg.data.drop_last)):
            drawn = [next(stream) for stream in streams]
            yield OwnBatches([x for x, _ in drawn], [y for _, y in drawn])

    def step(self, batch: OwnBatches) -> StepResult:
        """Σ_i CE(f_i(x_i), y_i): the submodels share no term, so each one's gradient is that of its own CE."""
        losses, accs = [], []
        for model, x, y in zip(self.run.models, batch.xs, batch.ys):
            model.train()
            logits = model(x)
            losses.append(F.cross_entropy(logits, y))
            accs.append((logits.argmax(dim=1) == y).float().mean().detach() * 100)
        losses = torch.stack(losses)
        # Each submodel saw its own batch: the mixture's figures on one batch would need extra forwards, so
        # the mixture is reported per epoch on the test set only.
        return StepResult(losses.sum(), StepFigures({"loss/clean": losses.detach(), "acc": torch.stack(accs)},
                                                    clean_logits=None, y=None, ensemble={}))

