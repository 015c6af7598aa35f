"""The `vanilla` stage: independent pretraining of the submodels on clean data.

Each submodel draws its own data order (and augmentation) from its own stream, so the submodels are
independently trained classifiers, and the result does not depend on which process trains which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvtrain.config import VanillaConfig
from dvtrain.data import batches, num_batches
from dvtrain.train.stage import OnStep, StageRun, StepFigures


class Vanilla:
    """Each owned submodel minimises CE(f_i(x), y) on its own batches (plain classifiers)."""

    name = "vanilla"
    config = VanillaConfig
    main_loss = "loss/clean"

    def __init__(self, run: StageRun) -> None:
        self.run = run

    def epoch(self, epoch: int, skip: int, on_step: OnStep) -> dict[str, int | float]:
        run, cfg = self.run, self.run.section
        ids, drop_last = run.placement.owned, run.cfg.data.drop_last
        streams = [
            batches(run.data.x_train, run.data.y_train, cfg.batch_size, run.owned.data_generators[i], run.augment_padding,
                    drop_last)
            for i in ids
        ]
        for step in range(num_batches(len(run.data.y_train), cfg.batch_size, drop_last)):
            drawn = [next(stream) for stream in streams]  # every stream advances, skipped steps included
            if step < skip:
                continue
            losses, accs, logits_all = [], [], []
            for i, model, (x, y) in zip(ids, run.models, drawn):
                x, y = run.replicas.shard(x, y)
                model.train()
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                run.owned.optimizers[i].zero_grad(set_to_none=True)
                loss.backward()
                run.owned.optimizers[i].step()
                losses.append(loss.detach())
                accs.append((logits.argmax(dim=1) == y).float().mean().detach() * 100)
                logits_all.append(logits.detach())
            # Each submodel saw its own batch: the mixture's figures are those of the last one's batch
            # under every submodel's pre-step logits would need extra forwards, so none are reported here.
            on_step(StepFigures({"loss/clean": torch.stack(losses), "acc": torch.stack(accs)},
                                clean_logits=None, y=None, ensemble={}), len(drawn[0][1]))
        return {}

