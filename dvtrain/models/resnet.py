"""ResNet-20 for CIFAR (He et al. 2016) as in the DVERGE reference code, with 1×1-conv shortcuts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.models.base import LayeredNet, Normalize


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (applied by the next consumer)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def layers(self, x: Tensor) -> Iterator[Tensor]:
        """The block's two feature layers, both before their ReLU: bn1's output, then the residual sum."""
        h = self.bn1(self.conv1(x))
        yield h
        yield self.bn2(self.conv2(F.relu(h))) + self.shortcut(x)


class ResNet20(LayeredNet):
    """Stem conv+BN, 3 stages × 3 blocks (16/32/64 wide, stride 2 entering stages 2 and 3), pool, FC.

    Layers, before their ReLU: 1 stem BN; then per block (9 in order) its bn1 output and its
    residual sum (2..19); 20 logits. Global average pooling makes it indifferent to image size.
    """

    def __init__(self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv = conv3x3(in_channels, 16)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for k in range(3):
                blocks.append(BasicBlock(cin, width, stride if k == 0 else 1))
                cin = width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(64, num_classes)
        self.num_layers = 2 + 2 * len(self.blocks)
        # Every conv (shortcuts too) drawn from N(0, 2 / (k·k·out_channels)): Kaiming normal over the fan-out,
        # as the DVERGE reference (zjysteven/DVERGE models/resnet.py); the rest keep torch's defaults
        # (BatchNorm weight 1 and bias 0, as the reference sets them).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def layers(self, x: Tensor) -> Iterator[Tensor]:
        out = self.bn(self.conv(self.normalize(x)))
        yield out
        for block in self.blocks:
            for out in block.layers(F.relu(out)):
                yield out
        yield self.fc(F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1))
