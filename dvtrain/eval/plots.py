"""PNG figures of an evaluation: the transferability heat map, accuracy against ε, and run comparisons.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state), so plotting works on headless machines and from several threads. Every function returns the
path it wrote.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dvtrain import rundir

PLOTS_DIR = rundir.PLOTS
DPI = 120
CELL_INCHES = 0.9  # heat-map cell size, so the numbers written in the cells stay legible
MIN_SIDE_INCHES = 3.5
LINE_FIGSIZE = (6.0, 4.0)
BAR_HEIGHT_INCHES = 4.5
BAR_GROUP_INCHES = 0.5  # width per bar group (column) of a comparison chart
PERCENT_RANGE = (0.0, 100.0)
HEATMAP_COLORS = "Reds"
DARK_CELL = 60.0  # cells above this success rate get white text
LINE_WIDTH, MIXTURE_LINE_WIDTH = 1.0, 3.0


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _display(name: str) -> str:
    """sub0 → S1 (the paper numbers submodels from 1), mixture → Mixture."""
    return f"S{int(name.removeprefix('sub')) + 1}" if name.startswith("sub") else name.capitalize()


def transfer_heatmap(matrix: dict, title: str, path: Path) -> Path:
    """Success rate (%) of examples crafted on the row's submodel against the column's model."""
    rows, cols = matrix["sources"], matrix["targets"]
    values = [[float("nan") if v is None else v for v in row] for row in matrix["success"]]
    fig = Figure(figsize=(max(MIN_SIDE_INCHES, CELL_INCHES * (len(cols) + 1)), max(MIN_SIDE_INCHES, CELL_INCHES * len(rows))))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap=HEATMAP_COLORS, vmin=PERCENT_RANGE[0], vmax=PERCENT_RANGE[1])
    ax.set_xticks(range(len(cols)), [_display(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_display(r) for r in rows])
    ax.set_xlabel("target model")
    ax.set_ylabel("source submodel")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if v != v else f"{v:.1f}", ha="center", va="center",
                    color="white" if v == v and v > DARK_CELL else "black")
    fig.colorbar(image, ax=ax, label="attack success (%)")
    ax.set_title(title)
    return _save(fig, path)


def eps_sweep_plot(sweep: dict, title: str, path: Path) -> Path:
    """Accuracy (%) against ε, one line per model (the mixture drawn thicker)."""
    fig = Figure(figsize=LINE_FIGSIZE)
    ax = fig.add_subplot()
    for name, accuracy in zip(sweep["models"], sweep["accuracy"]):
        ax.plot(sweep["eps"], accuracy, marker="o", label=_display(name), linewidth=MIXTURE_LINE_WIDTH if name == "mixture" else LINE_WIDTH)
    ax.set_xlabel("ε (L∞, pixels in [0, 1])")
    ax.set_ylabel("accuracy under PGD (%)")
    ax.set_ylim(*PERCENT_RANGE)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def comparison_plot(runs: list[str], columns: list[str], values: list[list[float | None]], title: str, path: Path) -> Path:
    """Grouped bars: one group per column (stage and metric), one bar per run; missing values are gaps."""
    fig = Figure(figsize=(max(LINE_FIGSIZE[0], BAR_GROUP_INCHES * len(columns) * max(len(runs), 1)), BAR_HEIGHT_INCHES))
    ax = fig.add_subplot()
    width = 1.0 / (len(runs) + 1)
    for r, (run, row) in enumerate(zip(runs, values)):
        xs = [c + r * width for c, v in enumerate(row) if v is not None]
        ax.bar(xs, [v for v in row if v is not None], width=width, label=run)
    ax.set_xticks([c + width * (len(runs) - 1) / 2 for c in range(len(columns))], columns, rotation=45, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(*PERCENT_RANGE)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def evaluation_plots(run_dir: Path, results: dict) -> dict[str, dict[str, str]]:
    """Every stage's heat map and ε sweep under RUN_DIR/plots/; stage → kind → path relative to the run."""
    run_dir = Path(run_dir)
    out: dict[str, dict[str, str]] = {}
    for stage, matrix in results.get("transfer", {}).items():
        path = transfer_heatmap(matrix, f"{stage}: PGD transfer success", run_dir / PLOTS_DIR / f"transfer_{stage}.png")
        out.setdefault(stage, {})["transfer"] = path.relative_to(run_dir).as_posix()
    for stage, sweep in results.get("eps_sweep", {}).items():
        path = eps_sweep_plot(sweep, f"{stage}: accuracy vs ε", run_dir / PLOTS_DIR / f"eps_sweep_{stage}.png")
        out.setdefault(stage, {})["eps_sweep"] = path.relative_to(run_dir).as_posix()
    return out
