"""Image classifiers for DVERGE: inputs in [0, 1], normalised inside, with layer-indexed features."""

from __future__ import annotations

from collections.abc import Sequence

from dvtrain.models.base import LayeredNet, Normalize, training_mode
from dvtrain.models.conv import ConvNet
from dvtrain.models.resnet import ResNet20

__all__ = ["ConvNet", "LayeredNet", "Normalize", "ResNet20", "build_model", "training_mode"]


def build_model(
    arch: str, in_channels: int, image_size: int, num_classes: int,
    mean: Sequence[float], std: Sequence[float], conv_padding: int | None = None,
) -> LayeredNet:
    """Build `arch` ("conv" or "resnet20") from torch's global RNG, which the caller seeds.

    `conv_padding` (conv only) None means 2 below 28 px, so small images survive, else 0 as LeNet.
    """
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {in_channels} input channels")
    if arch == "conv":
        padding = conv_padding if conv_padding is not None else (2 if image_size < 28 else 0)
        return ConvNet(in_channels, image_size, num_classes, mean, std, padding)
    if arch == "resnet20":
        return ResNet20(in_channels, num_classes, mean, std)
    raise ValueError(f"unknown arch {arch!r}; choose 'conv' or 'resnet20'")
