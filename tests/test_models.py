"""Models: shapes, layer-indexed features, early stopping, parameter counts, normalisation, seeding."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dvtrain.models import build_model

ARCHS = ["conv", "resnet20"]
SHAPES = [(1, 8), (1, 28), (3, 32)]  # (channels, image size)


def make(arch: str, channels: int, size: int, classes: int = 10):
    mean, std = (0.5,) * channels, (0.25,) * channels
    return build_model(arch, channels, size, classes, mean, std)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels,size", SHAPES)
def test_shapes_and_features(arch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = make(arch, channels, size, classes=7).eval()
    x = torch.rand(3, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, 7)
        assert torch.equal(model.features(x, model.num_layers), logits)
        for layer in range(1, model.num_layers + 1):
            f = model.features(x, layer)
            assert f.shape[0] == 3 and f.ndim >= 2
    for bad in (0, model.num_layers + 1):
        with pytest.raises(ValueError, match="out of range"):
            model.features(x, bad)


def test_layer_counts_and_shapes() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    conv, resnet = make("conv", 3, 32), make("resnet20", 3, 32)
    assert conv.num_layers == 5 and resnet.num_layers == 20
    assert [tuple(conv.features(x, k).shape[1:]) for k in range(1, 6)] == [(6, 28, 28), (16, 10, 10), (120,), (84,), (10,)]
    widths = [16] + [w for w in (16, 32, 64) for _ in range(6)] + [10]
    assert [resnet.features(x, k).shape[1] for k in range(1, 21)] == widths
    # Pre-ReLU features: BN outputs and residual sums take negative values.
    assert all((resnet.features(x, k) < 0).any() for k in range(1, 20))


def test_conv_flatten_width_follows_input() -> None:
    torch.manual_seed(0)
    assert make("conv", 1, 8).fc1.in_features == 16 * 2 * 2  # auto padding 2: 8→8→4→4→2
    assert make("conv", 1, 28).fc1.in_features == 256  # padding 0: 28→24→12→8→4
    assert make("conv", 3, 32).fc1.in_features == 400
    padded = build_model("conv", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, conv_padding=2)
    assert padded.fc1.in_features == 16 * 8 * 8
    with pytest.raises(ValueError, match="conv net: a 8 px input with padding 0 shrinks to nothing"):
        build_model("conv", 1, 8, 10, (0.5,), (0.25,), conv_padding=0)


def test_parameter_counts() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(make("resnet20", 3, 32)) == 272_474
    conv1, conv2 = 3 * 6 * 25 + 6, 6 * 16 * 25 + 16
    fc1, fc2, fc3 = 400 * 120 + 120, 120 * 84 + 84, 84 * 10 + 10
    assert (conv1, conv2, fc1, fc2, fc3) == (456, 2416, 48120, 10164, 850)
    assert count(make("conv", 3, 32)) == 62_006


def test_features_stop_early() -> None:
    torch.manual_seed(0)
    model = make("resnet20", 3, 32)
    x = torch.rand(2, 3, 32, 32)
    fired: list[str] = []
    model.blocks[-1].conv1.register_forward_hook(lambda *_: fired.append("last stage"))
    model.blocks[1].conv1.register_forward_hook(lambda *_: fired.append("block 2"))
    model.features(x, 1)
    model.features(x, 3)  # block 1's residual sum
    assert fired == []
    model.features(x, 4)  # block 2's bn1
    assert fired == ["block 2"]
    model(x)
    assert fired == ["block 2", "block 2", "last stage"]

    conv = make("conv", 3, 32)
    conv.fc3.register_forward_hook(lambda *_: fired.append("fc3"))
    conv.features(x, 4)
    assert fired.count("fc3") == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_normalization_is_inside(arch: str) -> None:
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model(arch, 3, 16, 10, mean, std).eval()
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())  # checkpoints carry them
    twin = copy.deepcopy(model)
    twin.normalize.mean.zero_()
    twin.normalize.std.fill_(1.0)
    x = torch.rand(4, 3, 16, 16)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin((x - m) / s))
        assert not torch.allclose(model(x), twin(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights(arch: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return make(arch, 3, 32).state_dict()

    a, b, c = weights(1), weights(1), weights(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg", 3, 32, 10, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="channels"):
        build_model("conv", 3, 32, 10, (0.5,), (0.25,))


def test_resnet20_convolutions_use_kaiming_normal_over_the_fan_out() -> None:
    """The reference draws each conv from N(0, 2/(k²·out_channels)) (zjysteven/DVERGE models/resnet.py); the
    sample std of each weight tensor is within 4 standard errors of that (fan-in would differ by up to 2×)."""
    torch.manual_seed(0)
    convs = [m for m in make("resnet20", 3, 32).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 9 * 2 + 2  # stem, two per block, two 1×1 shortcuts
    for conv in convs:
        k, out = conv.kernel_size[0], conv.out_channels
        expected = math.sqrt(2.0 / (k * k * out))
        n = conv.weight.numel()
        assert abs(conv.weight.std().item() - expected) < 4 * expected / math.sqrt(2 * n), (conv, expected)
        assert abs(conv.weight.mean().item()) < 4 * expected / math.sqrt(n)
