"""The base of every dvtrain model: normalisation inside the model and layer-indexed features.

Normalising inside keeps every input, and so every attack epsilon, in [0, 1] pixel units, and the
statistics travel with the weights in the state dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from itertools import islice

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, so checkpoints and `.to()` carry them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@contextlib.contextmanager
def training_mode(models: nn.Module | Sequence[nn.Module], train: bool) -> Iterator[None]:
    """Run a block with the model(s) in train (`True`) or eval mode, then give each back the mode it had."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    modes = [model.training for model in models]
    for model in models:
        model.train(train)
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


class LayeredNet(nn.Module):
    """A net written as a generator of its layer outputs, so `features` can stop at any layer.

    Subclasses set `num_layers` and implement `layers(x)`, yielding layers 1..num_layers in order,
    the last being the logits. `forward` and `features` run the same code, so
    `features(x, num_layers)` equals `forward(x)` exactly.
    """

    num_layers: int

    def layers(self, x: Tensor) -> Iterator[Tensor]:
        raise NotImplementedError

    def features(self, x: Tensor, layer: int) -> Tensor:
        """Output of layer `layer` (1-based); the layers after it are never computed."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} is out of range: {type(self).__name__} has layers 1..{self.num_layers}")
        return next(islice(self.layers(x), layer - 1, None))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x, self.num_layers)
