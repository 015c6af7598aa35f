"""Feature distillation stays in the ε-ball of x_s and in [0, 1], and moves layer-l features towards x's."""

import pytest
import torch

from dvtrain.config import DvergeConfig
from dvtrain.distill import distill
from dvtrain.models import build_model


def _model(arch, channels=1, size=8):
    torch.manual_seed(0)
    return build_model(arch, channels, size, 10, mean=(0.5,) * channels, std=(0.25,) * channels)


def _feature_distance(model, layer, a, b):
    with torch.no_grad():
        return float(((model.features(a, layer) - model.features(b, layer)) ** 2).flatten(1).sum(1).mean())


@pytest.mark.parametrize("arch, layers", [("conv", [1, 2, 3, 4, 5]), ("resnet20", [1, 6, 13, 20])])
@pytest.mark.parametrize("momentum, random_start", [(1.0, False), (0.0, True)])
def test_distilled_batch_in_ball_and_closer_in_features(arch, layers, momentum, random_start):
    model = _model(arch)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, x_s = torch.rand(16, 1, 8, 8, generator=g), torch.rand(16, 1, 8, 8, generator=g)
    cfg = DvergeConfig(eps=0.07, step_size=0.007, steps=10, momentum=momentum, random_start=random_start, bn_mode="eval")
    for layer in layers:
        z = distill(model, layer, x, x_s, cfg, torch.Generator().manual_seed(2))
        assert float((z - x_s).abs().max()) <= cfg.eps + 1e-6
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
        assert not z.requires_grad
        assert _feature_distance(model, layer, z, x) < 0.9 * _feature_distance(model, layer, x_s, x), layer


def test_distill_leaves_weights_without_gradients_and_mode_unchanged():
    model = _model("resnet20")
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    distill(model, 5, x, torch.rand(4, 1, 8, 8), DvergeConfig(steps=2, bn_mode="train"), torch.Generator())
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_distill_images_are_independent_in_eval_mode():
    """Per-image gradient normalisation: an image's result does not depend on its batch-mates."""
    model = _model("conv")
    model.eval()
    g = torch.Generator().manual_seed(0)
    x, x_s = torch.rand(8, 1, 8, 8, generator=g), torch.rand(8, 1, 8, 8, generator=g)
    cfg = DvergeConfig(steps=5, bn_mode="eval")
    full = distill(model, 3, x, x_s, cfg, torch.Generator())
    half = distill(model, 3, x[:4], x_s[:4], cfg, torch.Generator())
    torch.testing.assert_close(full[:4], half, rtol=0, atol=1e-6)
