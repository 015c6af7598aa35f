"""The small conv net of a student report on DVERGE (LeNet-5 shaped), sized to the input."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.models.base import LayeredNet, Normalize


class ConvNet(LayeredNet):
    """conv5×5→6, pool, conv5×5→16, pool, FC 120, FC 84, FC classes; ReLU between.

    Layers, taken before their ReLU as the DVERGE reference does: 1 conv1, 2 conv2, 3 fc1, 4 fc2,
    5 logits. `padding` (on both convs) lets 8 px inputs survive two 5×5 convs and two pools.
    """

    num_layers = 5

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int,
        mean: Sequence[float], std: Sequence[float], padding: int,
    ) -> None:
        super().__init__()
        side = image_size
        for _ in range(2):  # conv 5×5 then 2×2 max pool
            side = (side + 2 * padding - 4) // 2
        if side < 1:
            raise ValueError(f"conv net: a {image_size} px input with padding {padding} shrinks to nothing")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=padding)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def layers(self, x: Tensor) -> Iterator[Tensor]:
        out = self.conv1(self.normalize(x))
        yield out
        out = self.conv2(F.max_pool2d(F.relu(out), 2))
        yield out
        out = self.fc1(F.max_pool2d(F.relu(out), 2).flatten(1))
        yield out
        out = self.fc2(F.relu(out))
        yield out
        yield self.fc3(F.relu(out))
