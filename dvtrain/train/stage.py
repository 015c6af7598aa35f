"""What a training stage is to the stage loop (`dvtrain.train.loop`): the method, none of the frame.

A stage is one class registered by name (`dvtrain.stages.StageSpec`; its name is also its config
section, a `dvtrain.config.StageConfig`). It supplies what is its own:

    batches(epoch) -> Iterator[Batch]     how the epoch's batches are drawn (whole batches, every row)
    step(batch) -> StepResult             the step's loss and its named figures (a typed record)
    epoch_figures() -> dict               figures of the epoch itself (e.g. DVERGE's layer), optional

and the loop owns everything around it: which steps a resumed epoch passes over (it still draws them,
so every random stream stays in step), the rows a data-parallel replica trains on (`Batch` fields are
sharded by rows), zeroing the gradients, the backward pass and the optimizers' steps, reducing and
logging the figures, checkpoints and the training state. A stage never calls `zero_grad`, `backward`
or an optimizer's `step`, never skips a step and never shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from dvtrain.config import Config, StageConfig
from dvtrain.data import Dataset
from dvtrain.distributed.placement import Placement
from dvtrain.distributed.replicas import Replicas
from dvtrain.submodels import Owned
from dvtrain.timing import PhaseTimer


@dataclass
class Batch:
    """One step's data. Every `Tensor` field (and every tensor of a list field) has the batch's rows as
    its first dimension: the loop hands a data-parallel replica its rows of all of them at once. Other
    fields (e.g. DVERGE's layer) pass unchanged. `full_rows` is the whole batch's row count, set by the
    loop before it shards (a replica's part-batch means are scaled to full-batch ones with it)."""

    full_rows: int = field(default=0, kw_only=True)

    def row_tensors(self) -> list[Tensor]:
        """The tensors that are sharded by rows, in field order."""
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                found.append(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
                found.extend(value)
        return found

    def with_rows(self, tensors: list[Tensor]) -> Batch:
        """A copy with `row_tensors()` replaced, in the same order, by `tensors`."""
        rest, changes = iter(tensors), {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = next(rest)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
                changes[f.name] = type(value)(next(rest) for _ in value)
        return dataclasses.replace(self, **changes)


@dataclass
class StepFigures:
    """What one step reports, kept on the device: nothing here waits for the device.

    `per_submodel`: name → [n_own] tensor, one entry per owned submodel (e.g. "loss/dverge").
    `clean_logits`: [n_own, B, K] logits of the owned submodels on the step's clean batch, and
    `y` its labels [B]: the loop derives the mixture's loss and accuracy from them when it reduces
    (None for both when the submodels did not see one common batch).
    `ensemble`: name → scalar tensor computed from every submodel alike (e.g. ADP's entropy).
    """

    per_submodel: dict[str, Tensor]
    clean_logits: Tensor | None
    y: Tensor | None
    ensemble: dict[str, Tensor]


@dataclass
class StepResult:
    """A step's loss (a scalar whose gradient with respect to each owned submodel's weights is that
    submodel's own loss gradient; the loop backpropagates it) and its figures."""

    loss: Tensor
    figures: StepFigures


@dataclass
class StageRun:
    """Everything a stage trains with. Built by the stage loop for one stage.

    `shared` draws whatever must be the same on every process (batches, layers, per-batch noise).
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
    def section(self) -> StageConfig:
        """This stage's config section."""
        return self.cfg.section(self.name)

    @property
    def augment_padding(self) -> int | None:
        return self.cfg.data.crop_padding if self.cfg.data.augment else None

    @property
    def models(self) -> list[torch.nn.Module]:
        """The owned submodels, in submodel order."""
        return [self.owned.models[i] for i in self.placement.owned]


class Stage:
    """Base of every stage (see the module's docstring). Subclasses set `name` (as registered) and
    `main_loss` (the per-submodel figure the progress bar and the loss plot show), and implement
    `batches` and `step`."""

    name: ClassVar[str]
    main_loss: ClassVar[str]

    def __init__(self, run: StageRun) -> None:
        self.run = run

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches, drawn identically on every process that needs them (all rows)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> StepResult:
        """The step's loss of the owned submodels on `batch` (this replica's rows) and its figures."""
        raise NotImplementedError

    def epoch_figures(self) -> dict[str, Any]:
        """Figures of the epoch just drawn by `batches` (logged per epoch), e.g. {"layer": 3}."""
        return {}

    def graph_key(self, batch: Batch) -> Hashable | None:
        """compute.cuda_graphs: what a CUDA graph of this step bakes in besides the batch's shapes (e.g. the
        layer and learning rates), or None when the step cannot be replayed (it draws on the host)."""
        return None

    def before_eager(self) -> None:
        """compute.cuda_graphs: called before every step that runs Python (see `dvtrain.compute.CapturedStep`)."""
