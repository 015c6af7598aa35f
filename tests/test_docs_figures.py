"""Every figure the docs quote for the quickstart is checked against the config or the measurement it names
(issue 29, item 5): a figure that goes stale when the config or a new measurement changes fails here.

- README's seed table is recomputed from `docs/measurements/quickstart_seeds.json` (every seed's rows, as
  extracted from each run's results.json), with the seed count, the epochs in its row labels and the ε in
  its headers taken from `configs/digits_quickstart.yaml`, and its "what holds in every seed" claims
  checked seed by seed;
- the quickstart's evaluation budget quoted in docs/evaluation.md ("Budgets") is read from the same config.
"""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import REPO
from dvtrain.config import load_config
from dvtrain.data import load_dataset

README = (REPO / "README.md").read_text(encoding="utf-8")
MEASURED = json.loads((REPO / "docs" / "measurements" / "quickstart_seeds.json").read_text(encoding="utf-8"))
QUICKSTART = load_config(REPO / "configs" / "digits_quickstart.yaml")
STAGES = {"vanilla": "vanilla, plain ensemble", "dverge": "DVERGE", "dverge_advt": "DVERGE+AdvT"}
# README's columns, in order, as keys of the measurement file (attack, then norm and ε where there is one).
COLUMNS = ["clean", "worst_case Linf {eps:g}", "fgsm Linf {eps:g}", "pgd_linf Linf {eps:g}",
           "pgd_linf_margin Linf {eps:g}", "worst_case L2 {l2:g}", "pgd_l2 L2 {l2:g}"]


def seed_table() -> tuple[str, list[list[str]]]:
    """The README's seed table: its header line and its body rows split into cells."""
    lines = README.splitlines()
    at = next(k for k, line in enumerate(lines) if line.startswith("| digits, Conv ×3, mixture ("))
    rows = []
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*").strip() for cell in line.strip("|").split("|")])
    return lines[at], rows


def columns() -> list[str]:
    return [c.format(eps=QUICKSTART.eval.eps, l2=QUICKSTART.eval.l2_eps) for c in COLUMNS]


def values(stage: str, column: str) -> list[float]:
    return [MEASURED["seeds"][seed][stage][column] for seed in sorted(MEASURED["seeds"], key=int)]


def test_the_seed_table_is_the_measurement_it_names():
    header, rows = seed_table()
    seeds = sorted(int(s) for s in MEASURED["seeds"])
    assert len(seeds) >= 5, "the README's spread needs at least 5 seeds"
    assert f"mixture ({len(seeds)} seeds)" in header
    assert f"ε={QUICKSTART.eval.eps:g}" in header and f"ε={QUICKSTART.eval.l2_eps:g}" in header
    assert f"seeds, {seeds[0]}–{seeds[-1]}" in README and seeds == list(range(seeds[0], seeds[-1] + 1))
    assert MEASURED["cpu"].split(",")[0] in README  # the CPU model it was measured on
    assert [row[0] for row in rows] == [
        f"{label} ({QUICKSTART.section(stage).epochs} epochs)" for stage, label in STAGES.items()]
    for (stage, _), row in zip(STAGES.items(), rows):
        for column, cell in zip(columns(), row[1:], strict=True):
            v = values(stage, column)
            assert cell == f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({min(v):.2f}–{max(v):.2f})", (
                stage, column)


def test_what_the_readme_says_holds_in_every_seed_does():
    for seed, stages in MEASURED["seeds"].items():
        for column in ("worst_case Linf", "worst_case L2"):
            key = next(c for c in columns() if c.startswith(column))
            ranked = [stages[stage][key] for stage in STAGES]
            assert ranked == sorted(ranked) and len(set(ranked)) == 3, (seed, column, ranked)
        assert min(stages[stage]["clean"] for stage in STAGES) >= 98.3, seed
    assert "the ranking of the worst cases, vanilla < DVERGE < DVERGE+AdvT" in README


def test_the_quickstart_has_the_test_images_the_docs_count():
    n = len(load_dataset(QUICKSTART.data).y_test)
    assert n == 359 and f"{n} test images" in README
    assert all(MEASURED["seeds"][s][stage]["clean"] * n / 100 == pytest.approx(
        round(MEASURED["seeds"][s][stage]["clean"] * n / 100), abs=1e-3) for s in MEASURED["seeds"] for stage in STAGES)


def test_the_two_s_d_range_the_readme_quotes():
    v = values("dverge", columns()[1])
    mean, sd = statistics.mean(v), statistics.stdev(v)
    assert f"DVERGE's worst case L∞: {mean - 2 * sd:.1f}–{mean + 2 * sd:.1f}" in README
    words = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
    assert f"**{words[len(v)]} seeds" in README and f"({words[len(v)]} of {words[len(v)]})" in README


def test_the_quickstart_budget_docs_evaluation_quotes_is_its_config():
    text = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    budgets = text[text.index("## Budgets"):]
    e, t, full = QUICKSTART.eval, QUICKSTART.eval.transfer, type(QUICKSTART.eval)()
    grid = ", ".join(f"{eps:g}" for eps in t.sweep_eps)
    assert f"ε ∈ {{{grid}}}" in budgets and f"(digits quickstart: {grid};" in text
    assert f"{e.autoattack.iterations} iterations and {e.autoattack.square_queries} Square" in budgets
    assert f"`eval.mixture_only: [{', '.join(e.mixture_only)}]`" in budgets
    assert t.surrogate_sizes == [3] and f"one surrogate ensemble of 3 trained for {t.surrogate_epochs} epochs" in budgets
    assert f"{t.blackbox_steps} steps, one run" in budgets and t.blackbox_restarts == 1
    assert f"on {t.num_images} images with {t.restarts} restarts" in budgets
    assert f"matrix on {e.diversity.num_images} pairs" in budgets
    # the ensemble attack keeps the full schedule, as the docs say
    a = e.adaptive
    assert (a.steps, a.blend_scales, a.target_classes) == (full.adaptive.steps, full.adaptive.blend_scales,
                                                           full.adaptive.target_classes)
    assert (f"MORA's full schedule** ({a.steps} steps, {len(a.blend_scales)} blends, {a.target_classes} targeted "
            "classes)") in budgets
