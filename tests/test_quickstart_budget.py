"""Issue 26, finding 5: the quickstart's reduced budget (configs/digits_quickstart.yaml) may save time only
where it moves no headline. Its mixture worst case (L∞, eval.eps) must equal the full protocol's (AutoAttack
at the library's budget, MORA's full ensemble-attack schedule) within one image, on three seeds.

Cheap but faithful: three small DVERGE ensembles (one per seed, trained once per session on digits), the
quickstart's own eval settings against the same settings with the full budget, on the first 120 test images."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY
from dvtrain.config import AdaptiveConfig, AutoAttackConfig, load_config
from dvtrain.data import load_dataset
from dvtrain.eval.whitebox import MIXTURE, WORST_CASE, evaluate_stage

SEEDS = (0, 1, 2)
IMAGES = 120
QUICKSTART = "configs/digits_quickstart.yaml"


@pytest.fixture(scope="session")
def dverge_ensembles(tmp_path_factory):
    """seed → (config, data, the dverge stage's submodels), trained in this process."""
    from dvtrain import cli
    from dvtrain.eval.load import load_stage

    out = {}
    for seed in SEEDS:
        run_dir = tmp_path_factory.mktemp(f"qs{seed}") / "run"
        overrides = [*TINY, "stages=[vanilla,dverge]", "vanilla.epochs=4", f"seed={seed}", "eval.attacks=[clean]"]
        assert cli.train_main(["--run-dir", str(run_dir), "--config", QUICKSTART, *overrides]) == 0
        cfg = load_config(run_dir / "config.yaml")
        data = load_dataset(cfg.data)
        out[seed] = (cfg, data, load_stage(run_dir, cfg, data, "dverge", torch.device("cpu")))
    return out


def linf_worst_case(rows: list[dict]) -> float:
    (row,) = [r for r in rows if r["model"] == MIXTURE and r["attack"] == WORST_CASE and r["norm"] == "Linf"]
    return round(row["accuracy"] * row["n"] / 100)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_quickstart_budget_gives_the_full_budgets_worst_case_within_one_image(dverge_ensembles, seed):
    cfg, data, submodels = dverge_ensembles[seed]
    quick = dataclasses.replace(cfg.eval, num_examples=IMAGES)
    library = AutoAttackConfig()  # the library's budget: 100 iterations, 5000 Square queries
    full = dataclasses.replace(quick, adaptive=AdaptiveConfig(),
                               autoattack=dataclasses.replace(quick.autoattack, iterations=library.iterations,
                                                              square_queries=library.square_queries))
    # The quickstart keeps the ensemble attack's full schedule: the attack that decides its worst case.
    assert quick.adaptive == AdaptiveConfig()
    attacks = [a for a in cfg.eval.full_attacks if a not in ("pgd_l2", "pgd_l2_margin")]  # L∞ is the headline
    robust = [linf_worst_case(evaluate_stage("dverge", submodels, data.x_test, data.y_test, e, cfg.seed, attacks=attacks))
              for e in (quick, full)]
    assert abs(robust[0] - robust[1]) <= 1, f"seed {seed}: quickstart {robust[0]}, full budget {robust[1]} robust images"
    assert robust[1] > 0  # the mixture keeps images robust: the comparison can fail
