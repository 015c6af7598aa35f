"""The paper's black-box figure (Yang et al., NeurIPS 2020, Fig. 4 style): the mixture's accuracy under
"all" transfer example sets against ε, one line per stage, so that DVERGE's curve can be read against
vanilla's and the baselines' on identical examples. Drawn with matplotlib's object API (no pyplot)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dvtrain.eval.blackbox import MIXTURE
from dvtrain.eval.report import stage_order

PLOTS_DIR = "plots"  # as dvtrain.eval.plots writes them
FILE = "blackbox_all.png"
KIND = "blackbox"  # the key under results["plots"][stage]
FIGSIZE = (6.0, 4.0)
DPI = 120
PERCENT_RANGE = (0.0, 100.0)


def blackbox_plot(tables: dict[str, dict], n_images: int, path: Path) -> Path:
    """Accuracy (%) of each stage's mixture under every transfer example set at ε ("all"), against ε."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    for stage in stage_order(tables):
        table = tables[stage]
        if "all" not in table:  # an older results.json layout without the ε sweep
            continue
        row = table["all"][table["models"].index(MIXTURE)]
        ax.plot(table["eps"], [float("nan") if v is None else v for v in row], marker="o", label=stage)
    ax.set_xlabel("ε (L∞, pixels in [0, 1])")
    ax.set_ylabel("accuracy under all transfer attacks (%)")
    ax.set_ylim(*PERCENT_RANGE)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Black-box transfer, mixture, {n_images} test images")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def add_blackbox_plot(run_dir: Path, results: dict) -> None:
    """Draw the figure under RUN_DIR/plots/ and record it in results["plots"][stage]["blackbox"] for every
    stage with a black-box table (one figure shows them all)."""
    tables = results.get("blackbox", {})
    if not tables:
        return
    n_images = results.get("blackbox_surrogate", {}).get("n_images", 0)
    rel = blackbox_plot(tables, n_images, Path(run_dir) / PLOTS_DIR / FILE).relative_to(run_dir).as_posix()
    for stage in tables:
        results.setdefault("plots", {}).setdefault(stage, {})[KIND] = rel
