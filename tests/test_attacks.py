"""FGSM, PGD-L∞ and PGD-L2 on a small trained conv net: budgets, strength, side effects, and a
cross-check against straightforward reference implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.attacks import fgsm, pgd_l2, pgd_linf
from dvtrain.mixture import Mixture

K = 3
EPS = 0.1  # L∞: a budget the net below is not robust to (its class patterns have amplitude 0.15)
L2_EPS = 0.75


class TinyNet(nn.Module):
    """1x8x8 images in [0, 1] -> K logits; normalises inside like dvtrain's models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv((x - 0.5) / 0.25)).flatten(1))


def make_data(n: int, g: torch.Generator, templates: Tensor) -> tuple[Tensor, Tensor]:
    """Separable classes: a per-class ±pattern on grey plus pixel noise."""
    y = torch.randint(0, K, (n,), generator=g)
    x = (0.5 + 0.15 * templates[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def train_net(seed: int, x: Tensor, y: Tensor, steps: int = 150) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(K, 1, 8, 8, generator=g).sign()
    x_train, y_train = make_data(1024, g, templates)
    x_test, y_test = make_data(256, g, templates)
    return train_net(0, x_train, y_train), x_test, y_test


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean() * 100)


def run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int = 1, steps: int = 10) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "fgsm":
        return fgsm(model, x, y, eps)
    if name == "pgd_linf":
        return pgd_linf(model, x, y, eps, eps / 4, steps, random_start=False)
    if name == "pgd_linf_rs":
        return pgd_linf(model, x, y, eps, eps / 4, steps, random_start=True, generator=g)
    if name == "pgd_l2":
        return pgd_l2(model, x, y, eps, eps / 4, steps, random_start=False)
    assert name == "pgd_l2_rs"
    return pgd_l2(model, x, y, eps, eps / 4, steps, random_start=True, generator=g)


ALL = ["fgsm", "pgd_linf", "pgd_linf_rs", "pgd_l2", "pgd_l2_rs"]


@pytest.mark.parametrize("name", ALL)
def test_attack_respects_budget_and_pixel_range(setup, name):
    model, x, y = setup
    eps = L2_EPS if name.startswith("pgd_l2") else EPS
    adv = run_attack(name, model, x, y, eps)
    assert adv.shape == x.shape and not adv.requires_grad
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).flatten(1)
    if name.startswith("pgd_l2"):
        norms = delta.norm(dim=1)
        assert norms.max() <= eps + 1e-5
        assert norms.max() > 0.5 * eps  # it does move
    else:
        assert delta.abs().max() <= eps + 1e-6
        assert delta.abs().max() >= eps - 1e-6


def test_attacks_lower_accuracy_and_pgd_beats_fgsm(setup):
    model, x, y = setup
    clean = accuracy(model, x, y)
    assert clean >= 95.0
    acc = {name: accuracy(model, run_attack(name, model, x, y, L2_EPS if "l2" in name else EPS), y) for name in ALL}
    for name in ALL:
        assert acc[name] < clean, (name, acc)
    # Same ε, PGD runs 10 steps of ε/4 from the same or a random start: it is the stronger attack here.
    assert acc["pgd_linf"] <= acc["fgsm"], acc
    assert acc["pgd_linf_rs"] <= acc["fgsm"], acc


@pytest.mark.parametrize("name", ALL)
def test_zero_budget_returns_x_unchanged(setup, name):
    model, x, y = setup
    assert torch.equal(run_attack(name, model, x, y, 0.0), x)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("train_mode", [True, False])
def test_attacks_leave_parameters_and_mode_alone(setup, name, train_mode):
    model, x, y = setup
    model.train(train_mode)
    try:
        before = [p.detach().clone() for p in model.parameters()]
        run_attack(name, model, x[:32], y[:32], EPS, steps=2)
        assert model.training is train_mode
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    finally:
        model.eval()


def test_attacks_work_inside_no_grad(setup):
    """Callers evaluating under torch.no_grad still get a real attack."""
    model, x, y = setup
    with torch.no_grad():
        adv = run_attack("pgd_linf", model, x, y, EPS)
    assert torch.equal(adv, run_attack("pgd_linf", model, x, y, EPS))
    assert not torch.equal(adv, x)


def reference_pgd_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, step: float, steps: int) -> Tensor:
    """Textbook PGD-L∞ from x itself, written independently with .backward() and torch.clamp."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        model.zero_grad()
        loss.backward()
        adv = adv.detach() + step * adv.grad.sign()
        adv = torch.clamp(torch.clamp(adv, min=x - eps, max=x + eps), 0.0, 1.0)
    model.zero_grad(set_to_none=True)
    return adv


def reference_pgd_l2_one(model: nn.Module, x: Tensor, y: Tensor, eps: float, step: float, steps: int) -> Tensor:
    """PGD-L2 on a single image [1, C, H, W], with scalar norms."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * grad / grad.norm()
        delta = adv - x
        if delta.norm() > eps:
            delta = delta * (eps / delta.norm())
        adv = (x + delta).clamp(0.0, 1.0)
    return adv


def test_pgd_linf_matches_reference_implementation(setup):
    model, x, y = setup
    ours = pgd_linf(model, x, y, EPS, 0.02, 7, random_start=False)
    ref = reference_pgd_linf(model, x, y, EPS, 0.02, 7)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_pgd_l2_matches_per_sample_reference(setup):
    """The batched per-sample normalisation equals attacking each image on its own."""
    model, x, y = setup
    x, y = x[:16], y[:16]
    ours = pgd_l2(model, x, y, L2_EPS, 0.2, 6, random_start=False)
    ref = torch.cat([reference_pgd_l2_one(model, x[i : i + 1], y[i : i + 1], L2_EPS, 0.2, 6) for i in range(len(y))])
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["pgd_linf_rs", "pgd_l2_rs"])
def test_random_start_is_reproducible_from_generator(setup, name):
    model, x, y = setup
    eps = L2_EPS if "l2" in name else EPS
    a = run_attack(name, model, x, y, eps, seed=5, steps=1)
    assert torch.equal(a, run_attack(name, model, x, y, eps, seed=5, steps=1))
    assert not torch.equal(a, run_attack(name, model, x, y, eps, seed=6, steps=1))


def test_random_starts_lie_inside_the_ball(setup):
    """With no steps the result is the random start itself: inside the ball, and not at x."""
    model, x, y = setup
    g = torch.Generator().manual_seed(3)
    start = pgd_l2(model, x, y, L2_EPS, 0.1, 0, random_start=True, generator=g)
    norms = (start - x).flatten(1).norm(dim=1)
    assert norms.max() <= L2_EPS + 1e-5 and norms.min() > 0 and norms.std() > 0  # random radii
    start = pgd_linf(model, x, y, EPS, 0.1, 0, random_start=True, generator=g)
    assert (start - x).abs().max() <= EPS + 1e-6 and not torch.equal(start, x)
    # no generator: torch's global stream, still inside the ball
    assert (pgd_linf(model, x, y, EPS, 0.1, 0, random_start=True) - x).abs().max() <= EPS + 1e-6


def test_mixture_is_attacked_end_to_end(setup):
    model, x, y = setup
    g = torch.Generator().manual_seed(7)
    templates = torch.randn(K, 1, 8, 8, generator=torch.Generator().manual_seed(0)).sign()
    x_train, y_train = make_data(1024, g, templates)
    mixture = Mixture([model, train_net(1, x_train, y_train, steps=100)])
    clean = accuracy(mixture, x, y)
    adv = pgd_linf(mixture, x, y, EPS, EPS / 4, 10, random_start=True, generator=g)
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert accuracy(mixture, adv, y) < clean
    assert all(p.grad is None for p in mixture.parameters())
