"""The `vanilla` stage: independent pretraining of the submodels on clean data.

Each submodel draws its own data order (and augmentation) from its own stream, so the submodels are
independently trained classifiers, and the result does not depend on which process trains which.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain.config import VanillaConfig
from dvtrain.data import Dataset, batches, num_batches
from dvtrain.submodels import Owned
from dvtrain.distributed.placement import Placement


def vanilla_epoch(
    owned: Owned,
    placement: Placement,
    data: Dataset,
    cfg: VanillaConfig,
    augment_padding: int | None,
    on_step: Callable[[dict[str, Tensor], int], None],
    skip: int = 0,
) -> None:
    """One epoch; the first `skip` batches are drawn but not trained on (resuming inside an epoch)."""
    ids = placement.owned
    streams = {
        i: batches(data.x_train, data.y_train, cfg.batch_size, owned.data_generators[i], augment_padding) for i in ids
    }
    for step in range(num_batches(len(data.y_train), cfg.batch_size)):
        if step < skip:
            for i in ids:
                next(streams[i])
            continue
        losses, accs, seen, weight = [], [], 0, 1.0
        for i in ids:
            x, y = next(streams[i])
            seen = len(y)
            rows = placement.batch_rows(seen)  # a replica's share of the batch
            weight = (rows.stop - rows.start) / seen
            x, y = x[rows], y[rows]
            model, optimizer = owned.models[i], owned.optimizers[i]
            model.train()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            placement.reduce_gradients(model, weight)
            optimizer.step()
            losses.append(loss.detach())
            accs.append((logits.argmax(dim=1) == y).float().mean().detach() * 100)
        figures = placement.sum_over_replicas(torch.stack([torch.stack(losses), torch.stack(accs)]), weight)
        on_step({"loss/clean": placement.all_gather(figures[0]), "acc/train": placement.all_gather(figures[1])}, seen)
