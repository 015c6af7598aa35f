"""PNG figures of an evaluation: the transferability heat map, accuracy against ε, and run comparisons.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state), so plotting works on headless machines and from several threads. Every function returns the
path it wrote.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dvtrain import rundir, storage
from dvtrain.eval.report import NOT_COMPARABLE, attack_header, model_label

PLOTS_DIR = rundir.PLOTS
DPI = 120
CELL_INCHES = 0.9  # heat-map cell size, so the numbers written in the cells stay legible
MIN_SIDE_INCHES = 3.5
LINE_FIGSIZE = (6.0, 4.0)
BAR_HEIGHT_INCHES = 4.5
BAR_GROUP_INCHES = 1.3  # width per bar group (column) of a comparison chart
BAR_SPAN = 0.8  # of a group's width, the part its bars fill
LEGEND_INCHES = 2.0  # room right of the axes for the legend of runs
MAX_WIDTH_INCHES = 16.0  # a comparison chart never grows wider (1920 px at DPI)
ERROR_CAP = 3  # points
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
PERCENT_RANGE = (0.0, 100.0)
HEATMAP_COLORS = "Reds"
DARK_CELL = 60.0  # cells above this success rate get white text
LINE_WIDTH, MIXTURE_LINE_WIDTH = 1.0, 3.0


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay the figure out and write it as PNG at DPI (creating the folder); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with storage.replacing(path, "plot") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def _display(name: str) -> str:
    """sub0 → Submodel 1, mixture → Mixture: the names of the results tables."""
    return model_label("", name)


def transfer_heatmap(matrix: dict, title: str, path: Path) -> Path:
    """Success rate (%) of examples crafted on the row's submodel against the column's model."""
    rows, cols = matrix["sources"], matrix["targets"]
    values = [[float("nan") if v is None else v for v in row] for row in matrix["success"]]
    fig = Figure(figsize=(max(MIN_SIDE_INCHES, CELL_INCHES * (len(cols) + 1)), max(MIN_SIDE_INCHES, CELL_INCHES * len(rows))))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap=HEATMAP_COLORS, vmin=PERCENT_RANGE[0], vmax=PERCENT_RANGE[1])
    ax.set_xticks(range(len(cols)), [_display(c) for c in cols], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [_display(r) for r in rows])
    ax.set_xlabel("target model")
    ax.set_ylabel("source submodel")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if v != v else f"{v:.1f}", ha="center", va="center",
                    color="white" if v == v and v > DARK_CELL else "black")
    fig.colorbar(image, ax=ax, label="attack success (%)")
    ax.set_title(title)
    return save_figure(fig, path)


def eps_sweep_figure(sweep: dict, title: str) -> Figure:
    """Accuracy (%) against ε: per model the worst case over the sweep's attacks (`dvtrain.eval.sweep`; the
    mixture thick, submodels thin), and the mixture under each attack alone, dashed. A results.json of
    dvtrain before the worst case (one attack, "accuracy") draws that attack's curves."""
    fig = Figure(figsize=LINE_FIGSIZE)
    ax = fig.add_subplot()
    worst = sweep.get("worst_case", sweep.get("accuracy"))
    for name, accuracy in zip(sweep["models"], worst):
        ax.plot(sweep["eps"], _nan(accuracy), marker="o", label=f"{_display(name)}, worst case" if "worst_case" in sweep
                else _display(name), linewidth=MIXTURE_LINE_WIDTH if name == "mixture" else LINE_WIDTH)
    mixture = sweep["models"].index("mixture")
    for attack, table in sweep.get("attacks", {}).items():
        if any(v is not None for v in table[mixture]):
            ax.plot(sweep["eps"], _nan(table[mixture]), linestyle="--", linewidth=LINE_WIDTH,
                    label=f"Mixture, {attack_header(attack)}")
    ax.set_xlabel("ε (L∞, pixels in [0, 1])")
    ax.set_ylabel("robust accuracy (%)" if "worst_case" in sweep else "accuracy under PGD (%)")
    ax.set_ylim(*PERCENT_RANGE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def _nan(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def eps_sweep_plot(sweep: dict, title: str, path: Path) -> Path:
    """`eps_sweep_figure` written as PNG to `path`."""
    return save_figure(eps_sweep_figure(sweep, title), path)


def _bars(ax, series: dict[str, dict[tuple[str, str], list[float]]], groups: list[tuple[str, str]],
          tick: list[str], marked: set[tuple[str, str, str]] = frozenset()) -> None:
    """One bar per run in each group: the mean, with the sample s.d. as an error bar where a run has
    several values (seeds); a run without a group's number leaves a gap; a (run, stage, column) in
    `marked` gets a † above its bar (another basis than its column's, as in the table)."""
    width = BAR_SPAN / max(len(series), 1)
    for r, (run, values) in enumerate(series.items()):
        at = [(g, values[key]) for g, key in enumerate(groups) if key in values]
        if not at:  # nothing of this run here: no legend entry (its colour stays its own in every figure)
            continue
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in at]
        xs = [g + (r - (len(series) - 1) / 2) * width for g, _ in at]
        heights = [statistics.mean(v) for _, v in at]
        ax.bar(xs, heights, width=width, label=run, color=COLORS[r % len(COLORS)],
               yerr=spread if any(spread) else None, capsize=ERROR_CAP, error_kw={"elinewidth": LINE_WIDTH})
        for x, h, sd, (g, _) in zip(xs, heights, spread, at):
            if (run, *groups[g]) in marked:
                ax.annotate(NOT_COMPARABLE, (x, min(h + sd, PERCENT_RANGE[1])), ha="center", va="bottom")
    ax.set_xticks(range(len(groups)), tick)
    ax.set_ylim(*PERCENT_RANGE)
    ax.grid(axis="y", alpha=0.3)


def comparison_plots(series: dict[str, dict[tuple[str, str], list[float]]], kinds: dict[str, str], stages: list[str],
                     path: Path, marked: set[tuple[str, str, str]] = frozenset(), separator: str = "_") -> list[Path]:
    """`dvtrain compare --plot FILE`: one PNG per kind of number, FILE's stem + _accuracy.png (one panel
    per stage, a bar group per accuracy column) and, where there are transfer numbers, + _transfer.png
    (transfer success, lower is better: a bar group per stage; one file per transfer column, + _transfer_eps<ε>.png
    where there are several, so none overwrites another). `series`: run → (stage, column) → the values of the
    run's seeds (mean drawn, s.d. as error bar); `kinds`: column → "accuracy" | "transfer"; `marked`: the
    (run, stage, column) bars that get a †.
    """
    path = Path(path)
    written = []
    accuracy = [c for c, k in kinds.items() if k == "accuracy"]
    panels = [s for s in stages if any((s, c) in v for v in series.values() for c in accuracy)]
    if panels:
        widths = [max(1, sum(any((s, c) in v for v in series.values()) for c in accuracy)) for s in panels]
        fig = Figure(figsize=(min(MAX_WIDTH_INCHES, max(LINE_FIGSIZE[0], BAR_GROUP_INCHES * sum(widths) + LEGEND_INCHES)),
                              BAR_HEIGHT_INCHES))
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False, gridspec_kw={"width_ratios": widths})[0]
        for ax, stage in zip(axes, panels):
            columns = [c for c in accuracy if any((stage, c) in v for v in series.values())]
            _bars(ax, series, [(stage, c) for c in columns], [c.replace(" ε=", "\nε=") for c in columns], marked)
            ax.set_title(stage)
        axes[0].set_ylabel("accuracy (%), higher is better")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="run")
        written.append(save_figure(fig, path.with_name(f"{path.stem}{separator}accuracy.png")))
    transfer = [c for c, k in kinds.items() if k == "transfer"]
    for column in transfer:  # in practice one: the mean off-diagonal success at one ε
        own = [s for s in stages if any((s, column) in v for v in series.values())]
        if not own:
            continue
        fig = Figure(figsize=(max(LINE_FIGSIZE[0], BAR_GROUP_INCHES * len(own) + LEGEND_INCHES), BAR_HEIGHT_INCHES))
        ax = fig.add_subplot()
        _bars(ax, series, [(s, column) for s in own], own, marked)
        ax.set_ylabel("transfer success (%), lower is better")
        ax.set_title(column.replace("↓", "") + ": submodel → other submodels")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="run")
        eps = column.partition(" ε=")[2]
        kind = "transfer" if len(transfer) == 1 or not eps else f"transfer_eps{eps.replace('/', 'over')}"
        written.append(save_figure(fig, path.with_name(f"{path.stem}{separator}{kind}.png")))
    return written


def evaluation_plots(run_dir: Path, results: dict) -> dict[str, dict[str, str]]:
    """Every stage's heat map and ε sweep under RUN_DIR/plots/; stage → kind → path relative to the run."""
    run_dir = Path(run_dir)
    out: dict[str, dict[str, str]] = {}
    for stage, matrix in results.get("transfer", {}).items():
        path = transfer_heatmap(matrix, f"{stage}: PGD transfer success", run_dir / PLOTS_DIR / f"transfer_{stage}.png")
        out.setdefault(stage, {})["transfer"] = path.relative_to(run_dir).as_posix()
    for stage, sweep in results.get("eps_sweep", {}).items():
        path = eps_sweep_plot(sweep, f"{stage}: robust accuracy vs ε", run_dir / PLOTS_DIR / f"eps_sweep_{stage}.png")
        out.setdefault(stage, {})["eps_sweep"] = path.relative_to(run_dir).as_posix()
    return out
