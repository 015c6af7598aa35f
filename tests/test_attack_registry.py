"""The white-box attacks declared once (dvtrain.eval.attacks.registry): the config's names agree with the
registry, every record is complete, and every runner keeps its images in its threat model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dvtrain.config import AdaptiveConfig, AutoAttackConfig, EvalConfig, TransferConfig
from dvtrain.errors import DvtrainError
from dvtrain.eval.attacks.registry import (
    ALWAYS, ATTACKS, EACH_AUTOATTACK_NORM, L2, LINF, NEVER, WITH_RANDOM_START, attack, check_names,
)
from dvtrain.eval.whitebox import Cell, robust_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_config_s_attack_lists_are_checked_against_the_registry():
    cfg = EvalConfig(full_attacks=list(ATTACKS), transfer=TransferConfig(sweep_attacks=["pgd_linf", "autoattack", "adaptive"]))
    check_names(cfg)  # every default and every registered name passes
    with pytest.raises(ValueError, match="unknown attack 'pgd_linf_typo'; choose from clean, fgsm"):
        attack("pgd_linf_typo")
    with pytest.raises(DvtrainError, match="^eval.full_attacks: unknown attack 'pgd_linf_margn'; .*did you mean 'pgd_linf_margin'"):
        check_names(EvalConfig(full_attacks=["clean", "pgd_linf_margn"]))
    with pytest.raises(DvtrainError, match="^eval.mixture_only: unknown attack 'autoatack'; .*did you mean 'autoattack'"):
        check_names(EvalConfig(mixture_only=["autoatack"]))
    with pytest.raises(DvtrainError, match="^eval.transfer.sweep_attacks: 'pgd_l2' is not an L∞ attack"):
        check_names(EvalConfig(transfer=TransferConfig(sweep_attacks=["pgd_l2"])))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_record_is_complete(name):
    a = ATTACKS[name]
    assert a.name == name and a.header and a.randomised in (ALWAYS, WITH_RANDOM_START, NEVER)
    assert a.norm in (None, LINF, L2, EACH_AUTOATTACK_NORM)
    assert (a.perturb is None) + (a.robust is None) == (2 if a.norm is None else 1)  # clean runs nothing
    assert a.restarts == (a.randomised == WITH_RANDOM_START)  # only PGD repeats over eval.restarts


@pytest.mark.parametrize("name", [n for n, a in ATTACKS.items() if a.perturb is not None])
def test_every_runner_stays_in_its_threat_model(name):
    torch.manual_seed(0)
    submodels = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval() for _ in range(2)]
    from dvtrain.mixture import Mixture

    model = Mixture(submodels)
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct when clean: every attack has something to fool
    cfg = EvalConfig(eps=0.5, l2_eps=1.0, step_size=0.1, l2_step_size=0.3, steps=3, adaptive=AdaptiveConfig(steps=2, blend_scales=[0.5], target_classes=1))
    a = ATTACKS[name]
    eps = cfg.eps if a.norm == LINF else cfg.l2_eps
    adv = a.perturb(model, x, y, eps, cfg, torch.Generator().manual_seed(1), submodels, None)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if a.norm == LINF else delta.norm(dim=1)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert bool((size <= eps + 1e-6).all()) and bool((size > 0).any())  # ε large enough to move some image


def test_autoattack_runs_from_its_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = EvalConfig(eps=0.3, autoattack=AutoAttackConfig(version="custom", attacks=["apgd-ce"], norms=["Linf"], iterations=3))
    clean = robust_mask(model, x, y, Cell("clean", None, 0.0), cfg, torch.Generator())
    robust = robust_mask(model, x, y, Cell("autoattack", LINF, 0.3), cfg, torch.Generator(), aa_seed=0)
    assert bool(clean.all()) and robust.sum() < clean.sum()
