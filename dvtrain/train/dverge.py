"""DVERGE training (Yang et al., NeurIPS 2020, Algorithm 1), top to bottom, loss included.

    for each epoch:
        draw a layer l uniformly                                       (same for every submodel)
        for each pair of batches (x, y), (x_s, y_s):
            every submodel i distills x'_i = x'_{f_i^l}(x, x_s)        (from the pre-update weights)
            every submodel i minimises
                loss_i = α Σ_{j≠i} CE(f_i(x'_j), y_s) + β CE(f_i(x), y) + [CE(f_i(adv_i), y_s)]

α = `diversity_weight`, β = `clean_weight` (the reference code: α = 1, β = 0; the report's eq. 4 adds
the clean term); the bracket is DVERGE+AdvT's own adversarial examples (`plus_adv`, the reference's
plus-adv option). The engine (`dvtrain.train.engines`) computes distilled batches, adversarial examples
and logits for the owned submodels; where the submodels live is the placement's concern: this module
trains `placement.owned` and obtains the others' distilled batches with `placement.all_gather`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain.config import DvergeConfig
from dvtrain.data import paired_batches
from dvtrain.distributed.placement import Placement
from dvtrain.models import training_mode
from dvtrain.submodels import Owned
from dvtrain.timing import DISABLED, PhaseTimer
from dvtrain.train.engines import make_engine
from dvtrain.train.frame import update
from dvtrain.train.stage import Batch, Stage, StageRun, StepFigures, StepResult


def draw_layer(cfg: DvergeConfig, num_layers: int, generator: torch.Generator) -> int:
    """The epoch's layer l: `cfg.layer` if set, else uniform over 1..num_layers (the reference draws
    once per epoch, the same layer for every submodel and batch)."""
    if cfg.layer is not None:
        return cfg.layer
    return int(torch.randint(1, num_layers + 1, (1,), generator=generator))


def mean_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each batch of logits: [..., B, K] and labels [B] → [...]."""
    per_image = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(logits[..., 0].numel() // len(y)),
                                reduction="none")
    return per_image.view(logits.shape[:-1]).mean(dim=-1)


def dverge_loss(
    owned: Owned, placement: Placement, engine, layer: int,
    x: Tensor, y: Tensor, x_s: Tensor, y_s: Tensor, cfg: DvergeConfig, timer: PhaseTimer = DISABLED,
) -> StepResult:
    """The DVERGE loss of the owned submodels on the batch pair (x, y), (x_s, y_s), summed over them
    (submodel i's weights get exactly the gradient of loss_i), and the step's figures, on the device.

    Shapes: x, x_s [B, C, H, W] pixels in [0, 1]; y, y_s [B].
    """
    ids = placement.owned
    models = [owned.models[i] for i in ids]
    generators = [owned.generators[i] for i in ids]

    # Distill each owned submodel's non-robust features of x into x_s, from the pre-update weights.
    with timer("distill"):
        distilled_own = engine.distill(models, layer, x, x_s, cfg, generators)  # [n_own, B, C, H, W]
    # Every submodel's distilled batch, on every process: [N, B, C, H, W]. Data, not a graph.
    with timer("all_gather"):
        distilled = placement.all_gather(distilled_own)

    with timer("train"):
        # DVERGE+AdvT: each submodel's own PGD examples of the source batch, also from the pre-update
        # weights, before any training forward (the reference's order).
        for model in models:
            model.train()
        adv = engine.adversarial(models, x_s, y_s, cfg, generators) if cfg.plus_adv else None
        # The training forwards run in this order: adversarial, clean, diversity. BatchNorm running
        # statistics are updated in that order; each weight's gradient sums the terms in the reverse one.
        adv_loss = mean_cross_entropy(engine.logits(models, adv), y_s) if adv is not None else None
        if cfg.clean_weight > 0:
            clean_logits = engine.logits(models, x.expand(len(models), *x.shape))
        else:  # the clean batch only feeds the figures: no gradient, no BatchNorm update
            with torch.no_grad(), training_mode(models, False):
                clean_logits = engine.logits(models, x.expand(len(models), *x.shape))
        clean_loss = mean_cross_entropy(clean_logits, y)
        # Submodel i classifies the others' distilled batches x'_j as their source labels y_s: what
        # fools submodel j must not fool submodel i. Its own x'_i is never used.
        others = [[j for j in range(placement.size) if j != i] for i in ids]
        diversity = mean_cross_entropy(engine.logits_on(models, distilled, others), y_s).sum(dim=1)  # [n_own]

        loss = cfg.diversity_weight * diversity + cfg.clean_weight * clean_loss
        if adv_loss is not None:
            loss = loss + adv_loss

    per_submodel = {"loss/dverge": diversity.detach(), "loss/clean": clean_loss.detach()}
    if adv_loss is not None:
        per_submodel["loss/adv"] = adv_loss.detach()
    return StepResult(loss.sum(), StepFigures(per_submodel, clean_logits.detach(), y, ensemble={}))


def dverge_step(
    owned: Owned, placement: Placement, engine, layer: int,
    x: Tensor, y: Tensor, x_s: Tensor, y_s: Tensor, cfg: DvergeConfig, timer: PhaseTimer = DISABLED,
) -> StepFigures:
    """One whole DVERGE update outside the stage loop (tests, `dvtrain.tools.bench`): `dverge_loss`, then
    the loop's own optimizer update (`dvtrain.train.frame.update`). Returns the step's figures."""
    return update(owned, placement, dverge_loss(owned, placement, engine, layer, x, y, x_s, y_s, cfg, timer), timer)


@dataclass
class PairBatch(Batch):
    """A DVERGE step's batch pair (x, y), (x_s, y_s) ([B, C, H, W], [B]) and the epoch's layer."""

    x: Tensor
    y: Tensor
    x_s: Tensor
    y_s: Tensor
    layer: int


class Dverge(Stage):
    """The `dverge` stage: DVERGE from the vanilla submodels (`dverge.init_from`)."""

    name = "dverge"
    main_loss = "loss/dverge"

    def __init__(self, run: StageRun) -> None:
        super().__init__(run)
        # One engine for the whole stage: it keeps its wide network (and compiled graphs) between epochs.
        self.engine = make_engine(run.section.engine, run.cfg.compute)
        self.layer: int | None = None
        # compute.cuda_graphs replays steps from CUDA graphs, unless a step draws random starts on the host
        # (DVERGE+AdvT's PGD, dverge.random_start), which a graph would replay unchanged.
        self.replayable = not (run.section.random_start or run.section.plus_adv)
        if run.cfg.compute.cuda_graphs and not self.replayable and run.placement.is_main:
            print(f"[{run.name}] compute.cuda_graphs: runs eagerly (its random starts are drawn on the host)")

    def batches(self, epoch: int) -> Iterator[PairBatch]:
        """One epoch of Algorithm 1: the layer l, then the batch pairs, both drawn from `run.shared`
        (identical on every process)."""
        run, cfg = self.run, self.run.section
        self.layer = layer = draw_layer(cfg, run.models[0].num_layers, run.shared)
        pairs = paired_batches(
            run.data.x_train, run.data.y_train, cfg.batch_size, run.shared, run.augment_padding, run.cfg.data.drop_last
        )
        return (PairBatch(x, y, x_s, y_s, layer) for (x, y), (x_s, y_s) in pairs)

    def epoch_figures(self) -> dict[str, int]:
        return {"layer": self.layer}

    def step(self, batch: PairBatch) -> StepResult:
        run = self.run
        return dverge_loss(run.owned, run.placement, self.engine, batch.layer, batch.x, batch.y, batch.x_s, batch.y_s,
                           run.section, run.timer)

    def graph_key(self, batch: PairBatch) -> tuple | None:
        """A graph's kernels bake in the layer and the learning rates."""
        if not self.replayable:
            return None
        return batch.layer, tuple(self.run.owned.optimizers[i].param_groups[0]["lr"] for i in self.run.placement.owned)

    def before_eager(self) -> None:
        forget = getattr(self.engine, "forget", None)
        if forget is not None:
            forget()


class DvergeAdvt(Dverge):
    """The `dverge_advt` stage: DVERGE+AdvT (its section sets `plus_adv: true`)."""

    name = "dverge_advt"
