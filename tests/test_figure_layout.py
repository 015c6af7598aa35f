"""Every kind of PNG dvtrain draws, drawn from small synthetic results and checked as a reader sees it
(issue 29, item 3): no text past the canvas's edge, no two texts over each other (tick labels, titles,
colour-bar labels, legend entries, cell values), no axes squeezed by its legend, at most
`figure_style.MAX_WIDTH_INCHES` wide; the heat maps of one metric share one colour scale across stages;
titles name the attack(s), ε, budget and images; compare's † marks survive into its figures."""

from __future__ import annotations

import matplotlib.image
import pytest
from matplotlib.text import Text

from conftest import REPO
from dvtrain import figure_style as style
from dvtrain.eval import blackbox_plot, diversity, plots
from dvtrain.eval.report import NOT_COMPARABLE
from dvtrain.train.curves import LossCurves, loss_figure

MAX_PX = round(style.MAX_WIDTH_INCHES * style.DPI)
STAGES = ("vanilla", "dverge", "dverge_advt")


@pytest.fixture
def drawn(monkeypatch):
    """The figures written through `figure_style.save` during a test, as path → Figure."""
    figures = {}
    save = style.save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(style, "save", keep)
    return figures


def texts(fig) -> list[str]:
    return [t.get_text() for t, _ in style.drawn_texts(fig)]


def check_readable(fig, path) -> str:
    """Assert the figure's layout holds and its PNG is at most MAX_PX wide; returns all its text, joined."""
    assert style.layout_problems(fig) == [], path
    width = matplotlib.image.imread(path).shape[1]
    assert width <= MAX_PX, (path, width)
    return " ".join(t.replace("\n", " ") for t in texts(fig))


def transfer_matrix(level: float) -> dict:
    subs = ["sub0", "sub1", "sub2"]
    return {"eps": 0.1, "steps": 10, "step_fraction": 0.25, "restarts": 2, "n_images": 287, "sources": subs,
            "targets": [*subs, "mixture"],
            "success": [[100.0 if i == j else level + i for j in range(4)] for i in range(3)]}


def sweep(level: float) -> dict:
    models = ["sub0", "sub1", "sub2", "mixture"]
    row = [level, level - 20, level - 40]
    return {"eps": [0.05, 0.1, 0.15], "steps": 50, "step_fraction": 0.2, "restarts": 2, "n_images": 300,
            "models": models, "attacks": {"pgd_linf": [row] * 4, "pgd_linf_margin": [row] * 4},
            "of": {m: ["pgd_linf", "pgd_linf_margin"] for m in models}, "worst_case": [row] * 4}


def blackbox_table(level: float, surrogates: list[int]) -> dict:
    row = [level, level - 10, level - 20]
    sets = [{"surrogate": f"ens{k}", "attack": a, "loss": loss, "eps": e} for k in surrogates
            for a in ("mi_pgd", "m_di2_fgsm") for loss in ("ce", "cw") for e in (0.05, 0.1, 0.15)]
    return {"models": ["sub0", "mixture"], "n_images": 300, "eps": [0.05, 0.1, 0.15], "all": [row, row], "sets": sets,
            "all_by_surrogate": {f"ens{k}": [row, row] for k in surrogates},
            "protocol": {"steps": 20, "restarts": 1, "surrogates": [{"name": f"ens{k}", "size": k} for k in surrogates]}}


def diversity_entry(diagonal: float, off: float) -> dict:
    return {"models": ["sub0", "sub1", "sub2"], "n_images": 200,
            "matrix": [[diagonal if i == j else off + 0.1 * (i + j) for j in range(3)] for i in range(3)],
            "protocol": {"layer": None, "eps": 0.07, "steps": 10, "step_size": 0.007, "batch_size": 10}}


# ----------------------------------------------------------------------------- the checker itself


def test_the_layout_check_finds_cut_overlapping_and_squeezed_text():
    fig = style.new_figure(4.0, 3.0)
    ax = fig.add_subplot()
    ax.set_title("a title far too long to fit on a canvas only four inches wide, so it runs past both edges")
    ax.text(0.5, 0.5, "here")
    ax.text(0.5, 0.5, "there")
    found = style.layout_problems(fig)
    assert any("reaches past the canvas" in p for p in found)
    assert any("'here' and 'there' overlap" in p for p in found)
    fig = style.new_figure(6.0, 3.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], label="a label that takes most of the width beside")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: what squeezed compare's chart
    assert any("squeezed" in p for p in style.layout_problems(fig))


def test_fix_layout_turns_crowded_tick_labels():
    fig = style.new_figure(3.0, 3.0)
    ax = fig.add_subplot()
    ax.bar(range(5), [1] * 5)
    ax.set_xticks(range(5), [f"dverge_advt {k}" for k in range(5)])
    assert any("overlap" in p for p in style.layout_problems(fig))
    assert style.fix_layout(fig) == []
    assert fig.get_figwidth() <= style.MAX_WIDTH_INCHES


def test_tick_labels_outside_the_view_are_not_counted():
    fig = style.new_figure(4.0, 3.0)
    ax = fig.add_subplot()
    ax.plot([0.0, 1.0], [0.0, 1.0])
    ax.set_xlim(0.2, 0.8)
    ax.set_ylim(0.2, 0.8)
    shown = {float(t.replace("−", "-")) for t in texts(fig) if t}
    assert shown and all(0.2 <= v <= 0.8 for v in shown)


# ----------------------------------------------------------------------------- one test per figure kind


def test_transfer_heat_maps(tmp_path, drawn):
    for stage, level in zip(STAGES, (60.0, 20.0, 5.0)):
        path = plots.transfer_heatmap(transfer_matrix(level), f"{stage}: transfer between submodels",
                                      tmp_path / f"transfer_{stage}.png")
        text = check_readable(drawn[path.name], path)
        assert "PGD-L∞ ε=0.1" in text and "10 steps" in text and "287 test images" in text
        assert "lower is better" in text
    limits = {drawn[f"transfer_{s}.png"].axes[0].images[0].get_clim() for s in STAGES}
    assert limits == {style.PERCENT_RANGE}  # one scale: 0–100 % in every stage


def test_diversity_heat_maps_share_one_colour_scale(tmp_path, drawn):
    results = {"diversity": {"vanilla": diversity_entry(5.0, 8.0), "dverge": diversity_entry(7.0, 12.0),
                             "dverge_advt": {"models": ["sub0"], "matrix": None}}}
    diversity.diversity_plots(tmp_path, results)
    figures = {stage: drawn[f"diversity_{stage}.png"] for stage in ("vanilla", "dverge")}
    limits = {fig.axes[0].images[0].get_clim() for fig in figures.values()}
    values = [v for e in list(results["diversity"].values())[:2] for row in e["matrix"] for v in row]
    assert limits == {(min(values), max(values))}  # DVERGE's 4 nats more show as darker cells than vanilla's
    for stage, fig in figures.items():
        text = check_readable(fig, tmp_path / results["diversity"][stage]["plot"])
        assert "higher is more diverse (better)" in text and "200 test-image pairs" in text and "ε=0.07" in text
    assert "plot" not in results["diversity"]["dverge_advt"] and not (tmp_path / "plots" / "diversity_dverge_advt.png").exists()


def test_eps_sweep_figure(tmp_path, drawn):
    path = plots.eps_sweep_plot(sweep(80.0), "dverge: robust accuracy vs ε", tmp_path / "eps_sweep_dverge.png")
    text = check_readable(drawn[path.name], path)
    assert "PGD, PGD margin" in text and "50 steps" in text and "300 test images" in text and "higher is better" in text


@pytest.mark.parametrize("surrogates", [[3], [3, 5, 8]])
def test_blackbox_all(tmp_path, drawn, surrogates):
    tables = {stage: blackbox_table(level, surrogates) for stage, level in zip(STAGES, (50.0, 60.0, 80.0))}
    path = blackbox_plot.blackbox_plot(tables, list(STAGES), tmp_path / blackbox_plot.FILE,
                                       {s: t["protocol"] for s, t in tables.items()})
    fig = drawn[path.name]
    text = check_readable(fig, path)
    titles = [ax.get_title() for ax in fig.axes]
    if len(surrogates) == 1:  # its own panel would be the "all" panel again
        assert titles == ["surrogate ensemble of 3 models"]
    else:
        assert titles == [f"surrogate ensemble of {k} models" for k in surrogates] + ["all 3 surrogate ensembles"]
    assert "ens3" not in text  # the cache's name, not the reader's
    assert "momentum PGD, M-DI²-FGSM with CE and CW loss" in text and "20 steps" in text and "300 test images" in text
    assert "higher is better" in text


def test_whitebox_worst_case_names_both_bases_apart(tmp_path, drawn):
    rows = [{"table": "eval", "stage": stage, "model": "mixture", "attack": "worst_case", "norm": "Linf", "eps": 0.1,
             "accuracy": level, "ci_low": level - 4, "ci_high": level + 4, "n": 359,
             "of": ["fgsm", "pgd_linf", "pgd_linf_margin", "autoattack", "adaptive"]}
            for stage, level in zip(STAGES, (30.0, 40.0, 70.0))]
    rows.append({**rows[0], "table": "train", "accuracy": 99.0})  # the training-time table is not the headline
    path = blackbox_plot.whitebox_plot({s: sweep(level) for s, level in zip(STAGES, (60.0, 70.0, 90.0))},
                                       list(STAGES), tmp_path / blackbox_plot.WHITEBOX_FILE,
                                       blackbox_plot.table_worst_cases(rows))
    fig = drawn[path.name]
    text = check_readable(fig, path)
    assert "lines (ε sweep): White-box L∞, worst case per image over PGD, PGD margin" in text
    assert "300 test images" in text and "stars (white-box table, ε=0.1)" in text and "359 test images" in text
    assert "AutoAttack" in text
    stars = [line for line in fig.axes[0].get_lines() if line.get_marker() == blackbox_plot.TABLE_MARKER]
    assert sorted(float(line.get_ydata()[0]) for line in stars) == [30.0, 40.0, 70.0]  # not the train row's 99
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "dverge, ε sweep" in labels and "dverge, white-box table" in labels


def _series(runs: int, seeds: int) -> tuple[dict, dict]:
    series = {f"run-{r} with a long descriptive name": {} for r in range(runs)}
    for r, values in enumerate(series.values()):
        for s, stage in enumerate(STAGES):
            for column in ("Clean", "Worst L∞ ε=0.1", "Worst L2 ε=0.5", "BB all ε=0.1"):
                values[(stage, column)] = [50.0 + 10 * s + r + k for k in range(seeds)]
            values[(stage, "Transfer ↓ ε=0.1")] = [30.0 - 10 * s + r + k for k in range(seeds)]
    kinds = {"Clean": "accuracy", "Worst L∞ ε=0.1": "accuracy", "Worst L2 ε=0.5": "accuracy", "BB all ε=0.1": "accuracy",
             "Transfer ↓ ε=0.1": "transfer"}
    return series, kinds


@pytest.mark.parametrize("runs,seeds", [(2, 1), (5, 3)])
def test_compare_charts_keep_their_marks(tmp_path, drawn, runs, seeds):
    series, kinds = _series(runs, seeds)
    first = next(iter(series))
    marked = {(first, "dverge", "Worst L∞ ε=0.1"), (first, "vanilla", "Transfer ↓ ε=0.1")}
    paths = plots.comparison_plots(series, kinds, list(STAGES), tmp_path / "cmp.png", marked)
    assert [p.name for p in paths] == ["cmp_accuracy.png", "cmp_transfer.png"]
    for path in paths:
        fig = drawn[path.name]
        text = check_readable(fig, path)
        assert fig.get_suptitle()
        marks = [t for t in fig.findobj(Text) if t.get_text() == NOT_COMPARABLE]
        assert len(marks) == 1, path  # the one marked bar of this figure, and what † means
        assert f"{NOT_COMPARABLE}: another basis" in text
        assert ("mean over seeds" in text) == (seeds > 1)
        for ax in fig.axes:  # the legend sits below: the axes keep the width (with 4 bar groups in 2 panels a row)
            assert ax.bbox.width > 0.4 * fig.bbox.width / min(2, len(fig.axes))
    assert "transfer success (%), lower is better" in texts(drawn["cmp_transfer.png"])


def test_loss_curves(tmp_path):
    curves = LossCurves(list(range(1, 21)), {i: [1.0 / (e + i) for e in range(1, 21)] for i in range(3)},
                        list(range(1, 21)), [0.5 / e for e in range(1, 21)])
    fig = loss_figure(curves, "dverge", "loss/dverge")
    path = style.save(fig, tmp_path / "dverge_loss.png")
    text = check_readable(fig, path)
    assert "Mixture: test loss (NLL)" in text and "Submodel 3: training loss" in text


def test_the_shipped_figures_are_readable_at_page_width():
    """docs/img: no figure wider than the style's maximum (the black-box figure was 2016 px, its text
    about 5 px high once a page showed it at its width)."""
    shipped = sorted((REPO / "docs" / "img").rglob("*.png"))
    assert shipped
    for path in shipped:
        assert matplotlib.image.imread(path).shape[1] <= MAX_PX, path
