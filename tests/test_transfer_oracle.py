"""dvtrain's MI-FGSM and SGM steps against `torchattack` (MIT; Wu et al.'s and Dong et al.'s attacks as the
library implements them), on a toy residual net with nn.ReLU modules named as the library expects.

torchattack is not a dependency of dvtrain (it hard-wires cross-entropy, draws from torch's global
generator and finds residual branches by module names), so this test runs only where it is importable,
e.g. `pip download --no-deps torchattack==1.7.2` unpacked onto PYTHONPATH; tests/test_blackbox.py checks the
same steps against written-out formulas on every run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dvtrain.eval.attacks import mi_fgsm
from dvtrain.eval.attacks.mi_fgsm import momentum_pgd, skip_gradient

torchattack = pytest.importorskip("torchattack")

EPS, STEPS, GAMMA = 0.1, 7, 0.2


class Block(nn.Module):
    """x + conv2(relu(conv1(x))): the ReLU is a module inside the branch, named "relu"."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class Toy(nn.Module):
    """stage.1 is the block torchattack hooks ('relu' in its name, '0.relu' not; its parent not a 'layer')."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Identity(), Block())
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.head(self.stage(x).flatten(1))


@pytest.fixture()
def toy():
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.rand(16, 3, 6, 6)
    return model, x, model(x).argmax(1)


def test_momentum_pgd_is_torchattack_mifgsm(toy):
    model, x, y = toy
    theirs = torchattack.MIFGSM(model, device=torch.device("cpu"), eps=EPS, steps=STEPS, decay=1.0)(x, y)
    ours = momentum_pgd(model, x, y, EPS, EPS / STEPS, STEPS, 1.0, False)
    assert torch.allclose(ours, theirs.detach(), atol=1e-6)


def test_skip_gradient_attack_is_torchattack_sgm(toy, monkeypatch):
    model, x, y = toy
    monkeypatch.setitem(mi_fgsm.RESIDUAL_BRANCH_ENDS, Block, "conv2")
    with skip_gradient(model, GAMMA) as hooked:
        assert hooked == 1
        ours = momentum_pgd(model, x, y, EPS, EPS / STEPS, STEPS, 1.0, False)
    plain = momentum_pgd(model, x, y, EPS, EPS / STEPS, STEPS, 1.0, False)
    theirs = torchattack.SGM(model, device=torch.device("cpu"), hook_cfg="resnet18", eps=EPS, steps=STEPS, gamma=GAMMA)(x, y)
    assert torch.allclose(ours, theirs.detach(), atol=1e-6)
    assert not torch.allclose(ours, plain)  # γ changed the attack
