"""The paper's curves (Yang et al., NeurIPS 2020, Fig. 4 style), one line per stage so that DVERGE can be
read against vanilla and the baselines on identical examples:

- `blackbox_all.png`: the mixture's black-box accuracy against ε, one panel per surrogate ensemble
  (correct under every example set crafted on it at that ε) and one for "all" (every set at that ε);
- `whitebox_worst_case.png`: the mixture's worst case over the ε sweep's white-box attacks against ε.

Each point has its 95 % Wilson interval as an error bar. Drawn with matplotlib's object API (no pyplot)
from the merged results.json, so stages evaluated by separate `dvtrain eval` runs share the figures.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dvtrain import storage
from dvtrain.eval.blackbox import ALL_BY_SURROGATE, ALL_SETS, MIXTURE
from dvtrain.eval.report import stage_order
from dvtrain.eval.stats import PERCENT, wilson_interval

PLOTS_DIR = "plots"  # as dvtrain.eval.plots writes them
FILE = "blackbox_all.png"
WHITEBOX_FILE = "whitebox_worst_case.png"
KIND, WHITEBOX_KIND = "blackbox", "whitebox_worst_case"  # keys under results["plots"][stage]
PANEL_INCHES = (4.2, 3.6)
DPI = 120
FONT_SIZE = 10
PERCENT_RANGE = (0.0, 100.0)
EPS_LABEL = "ε (L∞, pixels in [0, 1])"


def _curve(ax: Axes, eps: list[float], values: list[float | None], n: int, label: str) -> None:
    """One stage's line with Wilson error bars (values in percent measured on n images)."""
    points = [(e, v) for e, v in zip(eps, values) if v is not None]
    if not points:
        return
    xs, ys = zip(*points)
    bounds = [wilson_interval(v / PERCENT * n, n) for v in ys]
    errors = [[y - low for y, (low, _) in zip(ys, bounds)], [high - y for y, (_, high) in zip(ys, bounds)]]
    ax.errorbar(xs, ys, yerr=errors, marker="o", markersize=4, capsize=3, label=label)


def _panels(titles: list[str]) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(PANEL_INCHES[0] * len(titles), PANEL_INCHES[1]))
    axes = [fig.add_subplot(1, len(titles), k + 1) for k in range(len(titles))]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=FONT_SIZE + 1)
        ax.set_xlabel(EPS_LABEL, fontsize=FONT_SIZE)
        ax.set_ylim(*PERCENT_RANGE)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=FONT_SIZE)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with storage.replacing(path, "plot") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def blackbox_plot(tables: dict[str, dict], order: list[str], path: Path) -> Path | None:
    """The mixture's black-box accuracy (%) against ε: one panel per surrogate ensemble, then "all"; one
    line per stage of `order` that has a table with the ε sweep. None when no table has one."""
    tables = {stage: tables[stage] for stage in order if stage in tables and ALL_SETS in tables[stage]}
    if not tables:
        return None
    surrogates = list(dict.fromkeys(name for t in tables.values() for name in t.get(ALL_BY_SURROGATE, {})))
    titles = [f"transfer from {name}" for name in surrogates] + ["all transfer attacks"]
    fig, axes = _panels(titles)
    for stage, table in tables.items():
        m = table["models"].index(MIXTURE)
        for ax, name in zip(axes, surrogates):
            if name in table.get(ALL_BY_SURROGATE, {}):
                _curve(ax, table["eps"], table[ALL_BY_SURROGATE][name][m], table["n_images"], stage)
        _curve(axes[-1], table["eps"], table[ALL_SETS][m], table["n_images"], stage)
    axes[0].set_ylabel("mixture accuracy (%)", fontsize=FONT_SIZE)
    axes[-1].legend(fontsize=FONT_SIZE - 1)
    sizes = sorted({t["n_images"] for t in tables.values()})  # stages evaluated apart may differ
    n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]} (per stage)"
    fig.suptitle(f"Black-box transfer (correct under every example set at ε), n = {n}", fontsize=FONT_SIZE + 1)
    return _save(fig, path)


def whitebox_plot(sweeps: dict[str, dict], order: list[str], path: Path) -> Path | None:
    """The mixture's white-box worst case (%) against ε, one line per stage of `order`; None without sweeps."""
    sweeps = {stage: sweeps[stage] for stage in order if stage in sweeps}
    if not sweeps:
        return None
    fig, (ax,) = _panels(["white-box worst case, mixture"])
    for stage, sweep in sweeps.items():
        _curve(ax, sweep["eps"], sweep["worst_case"][sweep["models"].index(MIXTURE)], sweep["n_images"], stage)
    ax.set_ylabel("mixture accuracy (%)", fontsize=FONT_SIZE)
    ax.legend(fontsize=FONT_SIZE - 1)
    return _save(fig, path)


def add_blackbox_plot(run_dir: Path, results: dict, trained: list[str] | tuple[str, ...] = ()) -> None:
    """Draw both figures under RUN_DIR/plots/ from `results` (results.json as merged: every evaluated
    stage, in training order `trained`) and record them in results["plots"][stage] for each stage drawn."""
    order = stage_order(set(results.get("blackbox", {})) | set(results.get("eps_sweep", {})), trained)
    plots = results.setdefault("plots", {})
    tables = results.get("blackbox", {})
    drawn = blackbox_plot(tables, order, Path(run_dir) / PLOTS_DIR / FILE)
    if drawn is not None:
        for stage in (s for s in tables if ALL_SETS in tables[s]):  # older tables without the ε sweep are not drawn
            plots.setdefault(stage, {})[KIND] = drawn.relative_to(run_dir).as_posix()
    drawn = whitebox_plot(results.get("eps_sweep", {}), order, Path(run_dir) / PLOTS_DIR / WHITEBOX_FILE)
    if drawn is not None:
        for stage in results.get("eps_sweep", {}):
            plots.setdefault(stage, {})[WHITEBOX_KIND] = drawn.relative_to(run_dir).as_posix()
