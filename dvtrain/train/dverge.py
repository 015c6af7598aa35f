"""DVERGE training, in the order of Algorithm 1 (Yang et al., 2020).

    for each epoch:
        draw a layer l uniformly                                       (same for every submodel)
        for each pair of batches (x, y), (x_s, y_s):
            every submodel i distills x'_i = x'_{f_i^l}(x, x_s)        (from the pre-update weights)
            every submodel i minimises Σ_{j≠i} CE(f_i(x'_j), y_s)      (+ own adversarial CE for +AdvT)

Where the submodels live is not this module's concern: it trains the ones `placement.owned` names
and obtains the others' distilled batches with `placement.all_gather`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain.config import DvergeConfig
from dvtrain.data import Dataset, paired_batches
from dvtrain.train.distill import training_mode
from dvtrain.submodels import Owned
from dvtrain.mixture import mixture_log_probs
from dvtrain.distributed.placement import Placement
from dvtrain.timing import DISABLED, PhaseTimer


def draw_layer(cfg: DvergeConfig, num_layers: int, generator: torch.Generator) -> int:
    if cfg.layer is not None:
        return cfg.layer
    return int(torch.randint(1, num_layers + 1, (1,), generator=generator))


def dverge_step(
    owned: Owned, placement: Placement, engine, layer: int,
    x: Tensor, y: Tensor, x_s: Tensor, y_s: Tensor, cfg: DvergeConfig, timer: PhaseTimer = DISABLED,
) -> dict[str, Tensor]:
    """One DVERGE update of the owned submodels; returns per-submodel and mixture figures for logging."""
    ids = placement.owned
    models = [owned.models[i] for i in ids]
    # A rank that is one of several replicas of its submodels works on its share of the batch rows.
    rows = placement.batch_rows(len(y))
    weight = (rows.stop - rows.start) / len(y)
    x, y, x_s, y_s = x[rows], y[rows], x_s[rows], y_s[rows]

    # Distill every owned submodel's non-robust features of x into x_s, all from pre-update weights.
    with timer("distill"):
        distilled_own = engine.distill(models, layer, x, x_s, cfg, [owned.generators[i] for i in ids])
    if timer.enabled:  # separate waiting for slower ranks from the transfer itself
        with timer("wait"):
            placement.barrier()
    # Every submodel's distilled batch, on every process: [size, B, C, H, W]. Data, not a graph.
    with timer("all_gather"):
        distilled = placement.all_gather(distilled_own)

    with timer("train"):
        return _train_on_distilled(owned, placement, engine, models, distilled, x, y, x_s, y_s, cfg, weight)


def _train_on_distilled(
    owned: Owned, placement: Placement, engine, models: list, distilled: Tensor,
    x: Tensor, y: Tensor, x_s: Tensor, y_s: Tensor, cfg: DvergeConfig, weight: float,
) -> dict[str, Tensor]:
    ids = placement.owned
    # Submodel i learns to classify the others' distilled batches as their source labels y_s:
    # what fools submodel j must not fool submodel i. Its own batch x'_i is never used.
    for i, model in zip(ids, models):
        model.train()
        owned.optimizers[i].zero_grad(set_to_none=True)
    diversity = engine.diversity_backward(models, ids, distilled, y_s, cfg.diversity_weight)

    clean_losses, clean_logits = [], []
    for model in models:
        if cfg.clean_weight > 0:  # the report's eq. (4): keep fitting clean data
            logits = model(x)
            clean = F.cross_entropy(logits, y)
            # Now, not with the adversarial loss: the attack's forwards update BatchNorm statistics in place.
            (cfg.clean_weight * clean).backward()
        else:
            with torch.no_grad(), training_mode(model, False):
                logits = model(x)
                clean = F.cross_entropy(logits, y)
        clean_losses.append(clean.detach())
        clean_logits.append(logits.detach())
    # DVERGE+AdvT: each submodel also resists its own PGD adversarial examples of the source batch.
    adv = engine.adversarial(models, x_s, y_s, cfg, [owned.generators[i] for i in ids]) if cfg.plus_adv else None

    adv_losses = []
    for k, (i, model) in enumerate(zip(ids, models)):
        if adv is not None:
            adv_loss = F.cross_entropy(model(adv[k]), y_s)
            adv_loss.backward()
            adv_losses.append(adv_loss.detach())
        placement.reduce_gradients(model, weight)
        owned.optimizers[i].step()

    return step_metrics(placement, y, weight, clean_logits, dverge=list(diversity), clean=clean_losses, adv=adv_losses)


def step_metrics(
    placement: Placement, y: Tensor, weight: float, clean_logits: list[Tensor], **per_submodel: list[Tensor]
) -> dict[str, Tensor]:
    """Per-submodel losses of every submodel, and the mixture's loss and accuracy on the clean batch.
    `weight` is this rank's share of the batch rows (1 without replicas)."""
    out = {}
    for name, values in per_submodel.items():
        if values:
            out[f"loss/{name}"] = placement.all_gather(placement.sum_over_replicas(torch.stack(values), weight))
    log_probs = mixture_log_probs(placement.all_gather(torch.stack(clean_logits)))
    mixture = torch.stack([F.nll_loss(log_probs, y), (log_probs.argmax(dim=1) == y).float().mean() * 100])
    out["mixture/loss"], out["mixture/acc"] = placement.sum_over_replicas(mixture, weight)
    return out


def dverge_epoch(
    owned: Owned,
    placement: Placement,
    data: Dataset,
    cfg: DvergeConfig,
    num_layers: int,
    augment_padding: int | None,
    shared: torch.Generator,
    engine,
    on_step: Callable[[dict[str, Tensor], int], None],
    timer: PhaseTimer = DISABLED,
    skip: int = 0,
) -> int:
    """One epoch of Algorithm 1. `shared` drives the layer and the batch pairs, identically on every
    process; the first `skip` pairs are drawn but not trained on (resuming inside an epoch).
    Returns the layer drawn."""
    layer = draw_layer(cfg, num_layers, shared)
    pairs = paired_batches(data.x_train, data.y_train, cfg.batch_size, shared, augment_padding)
    for step, ((x, y), (x_s, y_s)) in enumerate(pairs):
        if step < skip:
            continue
        on_step(dverge_step(owned, placement, engine, layer, x, y, x_s, y_s, cfg, timer), len(y))
    return layer
