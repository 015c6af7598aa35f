"""Budgets that fit the data (issue 22 item 3): the quickstart's eval section is below the full
protocol and says so in one line; the CIFAR configs keep the paper's and RobustBench's budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvtrain.config import load_config
from dvtrain.eval.budget import reduced_budget_note

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("cifar10_*.yaml")))
def test_cifar_configs_keep_the_full_budget(name):
    assert reduced_budget_note(load_config(CONFIGS / f"{name}.yaml").eval) is None


def test_the_quickstart_names_each_reduced_setting_in_one_line():
    note = reduced_budget_note(load_config(CONFIGS / "digits_quickstart.yaml").eval)
    assert note is not None and "\n" not in note
    for label in ("AutoAttack norms", "mixture-only attacks", "surrogate ensembles [3]", "black-box steps 20 (full: 100)"):
        assert label in note, label
    # the ensemble attack decides the worst case: the quickstart keeps its full schedule (issue 26, finding 5)
    assert "adaptive" not in note


def test_the_adaptive_rows_budget_names_its_blends():
    from dvtrain.config import EvalConfig
    from dvtrain.eval.whitebox import cell_budget, cells

    cfg = load_config(CONFIGS / "digits_quickstart.yaml", ["eval.adaptive.blend_scales=[0.5,0.0,1.0]"]).eval
    (cell,) = cells(["adaptive"], cfg)
    assert "blend_scales=0.5+0+1," in cell_budget(cell, cfg, 100)
    (cell,) = cells(["adaptive"], EvalConfig())
    assert "blend_scales=0.5+0+0.25+0.75+1," in cell_budget(cell, EvalConfig(), 100)


def test_the_note_names_the_real_full_budget_never_none():
    """Issue 29 item 1: "(full: None)" told the user nothing; a null full setting is named for what it means."""
    note = reduced_budget_note(load_config(CONFIGS / "digits_quickstart.yaml").eval)
    assert "None" not in note
    assert "AutoAttack iterations 25 (full: the library's 100)" in note
    assert "surrogate epochs 3 (full: the run's vanilla.epochs)" in note
