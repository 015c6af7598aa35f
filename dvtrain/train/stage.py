"""What a training stage is to the stage loop (`dvtrain.train.loop`).

A stage is one class: its name (which is also its config section), its config dataclass, the key of
its main loss, and an `epoch` method. The loop builds a `StageRun` with everything the stage trains
with, calls `epoch` once per epoch and knows nothing else about the stage. Adding a stage is one class
and one line in `dvtrain.train.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from dvtrain.config import Config
from dvtrain.data import Dataset
from dvtrain.distributed.placement import Placement
from dvtrain.distributed.replicas import Replicas
from dvtrain.submodels import Owned
from dvtrain.timing import PhaseTimer

# Called once per optimizer step with the step's figures (tensors on the device, see `StepFigures`)
# and the number of images the step trained on (the full batch, whatever the replicas split).
OnStep = Callable[["StepFigures", int], None]


@dataclass
class StepFigures:
    """What one step reports, kept on the device: nothing here waits for the device.

    `per_submodel`: name → [n_own] tensor, one entry per owned submodel (e.g. "loss/dverge").
    `clean_logits`: [n_own, B, K] logits of the owned submodels on the step's clean batch, and
    `y` its labels [B]: the loop derives the mixture's loss and accuracy from them when it reduces.
    `ensemble`: name → scalar tensor computed from every submodel alike (e.g. ADP's entropy).
    """

    per_submodel: dict[str, Tensor]
    clean_logits: Tensor
    y: Tensor
    ensemble: dict[str, Tensor]


@dataclass
class StageRun:
    """Everything a stage trains with. Built by the stage loop for one stage.

    `shared` draws whatever must be the same on every process (batches, layers, per-batch noise);
    `replicas.shard` hands a data-parallel replica its rows of a batch (all rows without replicas).
    """

    name: str
    cfg: Config
    owned: Owned
    placement: Placement
    replicas: Replicas
    data: Dataset
    shared: torch.Generator
    timer: PhaseTimer

    @property
    def section(self) -> Any:
        """This stage's config section (`cfg.<name>`)."""
        return getattr(self.cfg, self.name)

    @property
    def augment_padding(self) -> int | None:
        return self.cfg.data.crop_padding if self.cfg.data.augment else None

    @property
    def models(self) -> list[torch.nn.Module]:
        """The owned submodels, in submodel order."""
        return [self.owned.models[i] for i in self.placement.owned]

    def zero_grad(self) -> None:
        for i in self.placement.owned:
            self.owned.optimizers[i].zero_grad(set_to_none=True)

    def step_optimizers(self) -> None:
        for i in self.placement.owned:
            self.owned.optimizers[i].step()


class Stage(Protocol):
    name: ClassVar[str]  # also its config section
    config: ClassVar[type]  # the dataclass of that section
    main_loss: ClassVar[str]  # the per-submodel figure the progress bar shows

    def __init__(self, run: StageRun) -> None: ...

    def epoch(self, epoch: int, skip: int, on_step: OnStep) -> dict[str, int | float]:
        """Train one epoch; the first `skip` steps are drawn but not trained on (resuming inside an
        epoch). Returns the epoch's own figures to log (e.g. DVERGE's layer), possibly empty."""
        ...
