"""Engines: how the owned submodels' share of a DVERGE step is computed.

A DVERGE step asks an engine for the owned submodels' distilled batches, their own adversarial
examples (DVERGE+AdvT), and their logits on given batches, differentiable in the weights; the loss and
its one backward are the step's (`dvtrain.train.dverge`). `LoopEngine` does it one model at a time — the reference path,
simple and obviously right, which faster engines are tested against. `GroupedEngine` runs the owned
submodels as one network whose layers are n times wider (grouped convolutions, block-diagonal
matrix products), so each distillation step is one forward and one backward whatever the ensemble
size, and a step dispatches about a quarter of the reference's operators (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from dvtrain.attacks import linf_random_start, pgd_linf, pgd_linf_from
from dvtrain.compute import compile_features, uncompiled
from dvtrain.config import ComputeConfig, DvergeConfig
from dvtrain.models import LayeredNet, Normalize, training_mode
from dvtrain.distill import distill, feature_pgd


class LoopEngine:
    """One submodel at a time, one forward per distilled batch."""

    def distill(
        self, models: list[LayeredNet], layer: int, x: Tensor, x_s: Tensor, cfg: DvergeConfig,
        generators: list[torch.Generator],
    ) -> Tensor:
        """[len(models), B, C, H, W]: each model's distilled batch, from its current weights."""
        return torch.stack([distill(m, layer, x, x_s, cfg, g) for m, g in zip(models, generators)])

    def logits(self, models: list[LayeredNet], inputs: Tensor) -> Tensor:
        """[n, B, K]: model k's logits on inputs[k] ([n, B, C, H, W]), in the mode the models are in."""
        return torch.stack([model(batch) for model, batch in zip(models, inputs)])

    def logits_on(self, models: list[LayeredNet], batches: Tensor, which: list[list[int]]) -> Tensor:
        """[n, R, B, K]: model k's logits on batches[which[k][r]] ([M, B, C, H, W]), model by model."""
        return torch.stack([torch.stack([model(batches[j]) for j in row]) for model, row in zip(models, which)])

    def adversarial(
        self, models: list[LayeredNet], x: Tensor, y: Tensor, cfg: DvergeConfig, generators: list[torch.Generator]
    ) -> Tensor:
        """[len(models), B, C, H, W]: each model's own PGD-L∞ examples of (x, y), from a random start
        drawn from its generator (DVERGE+AdvT), in the mode the models are in."""
        return torch.stack([
            pgd_linf(m, x, y, cfg.adv_eps, cfg.adv_step_size, cfg.adv_steps, random_start=True, generator=g)
            for m, g in zip(models, generators)
        ])


# ----------------------------------------------------------------------------- grouped engine


@dataclass(frozen=True)
class _Layout:
    """How n models' copies of one tensor are joined: concatenated along `dim`, stacked on a new dim 0,
    or (matrices) placed on the diagonal of one block-diagonal matrix."""

    dim: int
    stacked: bool = False
    diagonal: bool = False

    def join(self, tensors: Sequence[Tensor]) -> Tensor:
        if self.diagonal:
            return torch.block_diag(*tensors)
        return torch.stack(tuple(tensors)) if self.stacked else torch.cat(tuple(tensors), dim=self.dim)

    def split(self, joined: Tensor, n: int) -> tuple[Tensor, ...]:
        if self.diagonal:
            rows, cols = joined.shape[0] // n, joined.shape[1] // n
            return tuple(joined[k * rows:(k + 1) * rows, k * cols:(k + 1) * cols] for k in range(n))
        return joined.unbind(0) if self.stacked else joined.chunk(n, dim=self.dim)


_CHANNELS = _Layout(dim=0)
_STACKED = _Layout(dim=0, stacked=True)
# Every module type that owns tensors, and how each of its tensors is joined. Channels are joined so
# that model k owns channel group k of every activation: [B, n·C, H, W].
_LAYOUTS: dict[type, dict[str, _Layout]] = {
    nn.Conv2d: {"weight": _CHANNELS, "bias": _CHANNELS},
    nn.BatchNorm2d: {
        "weight": _CHANNELS, "bias": _CHANNELS, "running_mean": _CHANNELS, "running_var": _CHANNELS,
        "num_batches_tracked": _STACKED,
    },
    # One Linear of n·in → n·out features with a block-diagonal weight: one matrix product (and one
    # for each gradient) however many models; the zero blocks cost arithmetic, not launches.
    nn.Linear: {"weight": _Layout(dim=0, diagonal=True), "bias": _CHANNELS},
    Normalize: {"mean": _Layout(dim=1), "std": _Layout(dim=1)},
}


class UnsupportedModelError(TypeError):
    """A model holds a layer that GroupedEngine cannot widen; engine=loop handles any model."""


def _own_tensors(module: nn.Module) -> list[str]:
    return [name for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if t is not None]


def _check_supported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if _own_tensors(module) and type(module) not in _LAYOUTS:
            raise UnsupportedModelError(
                f"engine 'grouped' cannot widen {name or 'the model'} ({type(module).__name__}); use dverge.engine=loop"
            )
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise UnsupportedModelError(f"engine 'grouped' supports zero-padded convolutions only ({name})")
        if isinstance(module, nn.BatchNorm2d) and (module.momentum is None or not module.track_running_stats):
            raise UnsupportedModelError(f"engine 'grouped' needs BatchNorm with a momentum and running stats ({name})")


def _widen(model: nn.Module, n: int) -> nn.Module:
    """A tensor-less copy of `model` whose layers take n models' channels side by side.

    The model's own `layers` code runs unchanged on [B, n·C, H, W] activations: ReLU, pooling and
    `flatten(1)` keep each model's channels in its own group, convolutions become grouped ones, and
    BatchNorm normalises each channel over the batch as before.
    """
    shell = copy.deepcopy(model).to("meta")
    uncompiled(shell)
    for module in shell.modules():
        if isinstance(module, nn.Conv2d):
            module.groups *= n
    return shell


def _layout_of(model: nn.Module) -> dict[str, _Layout]:
    """Dotted tensor name → layout, for every parameter and buffer of the model."""
    return {
        f"{prefix}.{name}" if prefix else name: _LAYOUTS[type(module)][name]
        for prefix, module in model.named_modules()
        for name in _own_tensors(module)
    }


class _JoinCache:
    """The n models' tensors joined, rejoined only where a source tensor changed.

    A DVERGE step joins the same weights for distillation, the clean logits and the diversity
    logits; the optimizer step (in place) changes their versions, so the next step joins afresh.
    Constant tensors (Normalize's statistics) are joined once. Parameters are joined with autograd
    enabled, so gradients flow back into each model's own `.grad` whatever the caller's grad mode;
    buffers are copies the forwards may update (see `_write_back_buffers`).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[Tensor, ...], tuple[int, ...], Tensor]] = {}

    def join(self, models: Sequence[nn.Module], layouts: dict[str, _Layout]) -> dict[str, Tensor]:
        states = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in models]
        joined = {}
        with torch.enable_grad():
            for name, layout in layouts.items():
                sources = tuple(s[name] for s in states)
                versions = tuple(t._version for t in sources)
                entry = self._entries.get(name)
                if entry is None or entry[1] != versions or any(a is not b for a, b in zip(entry[0], sources)):
                    entry = (sources, versions, layout.join(sources))
                    self._entries[name] = entry
                joined[name] = entry[2]
        return joined


@contextlib.contextmanager
def _bound(shell: nn.Module, joined: dict[str, Tensor]) -> Iterator[None]:
    """The shell computes with the joined tensors inside the block and holds none of them after it.

    `torch.func.functional_call` does the same around one `forward`, but distillation calls
    `features(x, layer)` many times with the same tensors.
    """
    slots = []
    for dotted, tensor in joined.items():
        owner, _, name = dotted.rpartition(".")
        module = shell.get_submodule(owner)
        store = module._parameters if name in module._parameters else module._buffers
        slots.append((store, name, store[name]))
        store[name] = tensor
    try:
        yield
    finally:
        for store, name, placeholder in slots:
            store[name] = placeholder


def _running_statistics(model: nn.Module) -> list[str]:
    """Dotted names of the buffers a forward in train mode updates: BatchNorm's running statistics.
    (Their version counters do not move when batch_norm updates them, so they are listed by type.)"""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, _ in module.named_buffers(recurse=False)]


def _write_back_buffers(
    models: Sequence[nn.Module], joined: dict[str, Tensor], layouts: dict[str, _Layout], names: list[str]
) -> None:
    """Copy the named buffers, which the forwards updated, back into each model."""
    per_model = [dict(m.named_buffers()) for m in models]
    with torch.no_grad():
        for name in names:
            for buffers, part in zip(per_model, layouts[name].split(joined[name], len(models))):
                buffers[name].copy_(part)


class GroupedEngine:
    """The owned submodels as one n-times-wider network; results equal LoopEngine's up to rounding.

    Each call joins the models' current tensors (a copy: the models stay ordinary modules with their
    own optimizers) and runs the model's own `layers` code on [B, n·C, H, W] activations. BatchNorm
    in train mode is supported exactly: each model's channels are normalised with its own batch
    statistics, and its running statistics receive the same updates, in the same order, as under
    LoopEngine. Supported layers: Conv2d (zero padding), Linear on flat inputs, BatchNorm2d, Normalize,
    and any deterministic parameter-free code that treats channels independently. Costs memory: the
    activations of all n submodels are alive at once (about twice the loop's peak for 3 submodels).
    """

    def __init__(self, compile: bool = False) -> None:
        self._compile = compile
        self._models: tuple[nn.Module, ...] = ()
        self._shell: nn.Module | None = None
        self._layouts: dict[str, _Layout] = {}
        self._running: list[str] = []
        self._joins = _JoinCache()
        self._rounds: dict[tuple, Tensor] = {}

    def _prepare(self, models: Sequence[nn.Module]) -> nn.Module:
        """The widened shell for these models, built once and reused while they stay the same."""
        if len(self._models) != len(models) or any(a is not b for a, b in zip(self._models, models)):
            _check_supported(models[0])
            self._models = tuple(models)
            self._shell = _widen(models[0], len(models))
            if self._compile:
                compile_features(self._shell)
            self._layouts = _layout_of(models[0])
            self._running = _running_statistics(models[0])
            self._joins = _JoinCache()
        return self._shell

    def forget(self) -> None:
        """Drop the joined tensors: needed after CUDA graph replays, which update the models' tensors
        without moving the version counters the join cache checks (`dvtrain.compute.CapturedStep`)."""
        self._joins = _JoinCache()

    @contextlib.contextmanager
    def _wide(self, models: Sequence[nn.Module], train: bool) -> Iterator[nn.Module]:
        """The shell bound to the models' joined tensors in the given mode; updated buffers are
        written back into the models when the block ends."""
        shell = self._prepare(models)
        joined = self._joins.join(models, self._layouts)
        with training_mode(shell, train), _bound(shell, joined):
            yield shell
        if train:
            _write_back_buffers(models, joined, self._layouts, self._running)

    def distill(
        self, models: list[LayeredNet], layer: int, x: Tensor, x_s: Tensor, cfg: DvergeConfig,
        generators: list[torch.Generator],
    ) -> Tensor:
        """[len(models), B, C, H, W]: each model's distilled batch, as `dvtrain.distill.distill`
        computes it. The PGD runs in the folded layout [B, n·C, H, W] from start to end."""
        n = len(models)
        with self._wide(models, cfg.bn_mode == "train") as shell:
            with torch.no_grad():
                target = shell.features(_fold(x.expand(n, *x.shape)), layer)
            anchor = _fold(x_s.expand(n, *x_s.shape))
            if cfg.random_start:
                start = _fold(torch.stack([linf_random_start(x_s, cfg.eps, g) for g in generators]))
            else:
                start = anchor
            z = feature_pgd(lambda z: shell.features(z, layer), target, start, anchor, cfg, groups=n)
        return _unfold(z, n)

    def logits(self, models: list[LayeredNet], inputs: Tensor) -> Tensor:
        """As `LoopEngine.logits`, in one wide forward."""
        return self._logits(models, [inputs])[:, 0]

    def logits_on(self, models: list[LayeredNet], batches: Tensor, which: list[list[int]]) -> Tensor:
        """As `LoopEngine.logits_on`, one wide forward per round r (model k on batches[which[k][r]]),
        so BatchNorm running statistics see the same sequence per model as in the loop. The index of
        each round is a device tensor made once, so no step copies indices from the host."""
        key = (tuple(map(tuple, which)), batches.device)
        if key not in self._rounds:
            self._rounds[key] = torch.tensor(list(zip(*which)), device=batches.device)  # [R, n]
        return self._logits(models, list(batches[self._rounds[key]].unbind(0)))

    def _logits(self, models: list[LayeredNet], rounds: list[Tensor]) -> Tensor:
        """[n, R, B, K] from R inputs of shape [n, B, C, H, W]. With gradients enabled, they flow back
        into each model's own parameters."""
        n = len(models)
        with self._wide(models, models[0].training) as shell:
            outs = [rearrange(shell(_fold(batch)), "b (n k) -> n b k", n=n) for batch in rounds]
        return torch.stack(outs, dim=1)

    def adversarial(
        self, models: list[LayeredNet], x: Tensor, y: Tensor, cfg: DvergeConfig, generators: list[torch.Generator]
    ) -> Tensor:
        """As `LoopEngine.adversarial`, every PGD step one wide forward and backward.

        The attack maximises the mean of all n models' cross-entropies on their own copies of x: each
        copy's gradient is its model's, scaled by 1/n, which leaves the sign steps unchanged."""
        n = len(models)
        start = torch.cat([linf_random_start(x, cfg.adv_eps, g) for g in generators])
        with self._wide(models, models[0].training) as shell:

            def stacked_logits(z: Tensor) -> Tensor:  # [n·B, C, H, W] → [n·B, K], model k on rows k·B…
                return rearrange(shell(_fold(z.view(n, *x.shape))), "b (n k) -> (n b) k", n=n)

            adv = pgd_linf_from(
                stacked_logits, x.repeat(n, *[1] * (x.ndim - 1)), y.repeat(n), start,
                cfg.adv_eps, cfg.adv_step_size, cfg.adv_steps,
            )
        return adv.view(n, *x.shape)


def _fold(batches: Tensor) -> Tensor:
    """[n, B, C, H, W] → [B, n·C, H, W]: model k's batch in channel group k.

    Channels-last: oneDNN's grouped convolutions are slower than n dense ones in NCHW but faster in
    channels-last (1.5× on Conv distillation, see docs/performance.md); the format changes no result.
    """
    return rearrange(batches, "n b c h w -> b (n c) h w").contiguous(memory_format=torch.channels_last)


def _unfold(folded: Tensor, n: int) -> Tensor:
    """[B, n·C, H, W] → [n, B, C, H, W], contiguous: the inverse of `_fold`."""
    return rearrange(folded, "b (n c) h w -> n b c h w", n=n).contiguous()


def make_engine(name: str, compute: ComputeConfig | None = None) -> LoopEngine | GroupedEngine:
    """The engine `name`. LoopEngine runs the models as they are (compiled or not by
    `dvtrain.compute.prepare_model`); GroupedEngine compiles its wide network if `compute` asks."""
    if name == "grouped":
        return GroupedEngine(compile=compute is not None and compute.compile)
    return LoopEngine()
