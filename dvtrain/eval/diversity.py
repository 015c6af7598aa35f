"""The vulnerability-diversity matrix of an ensemble: how much the submodels share non-robust features.

For submodels f_i, f_j, a layer l and a pair of images (x, y), (x_s, y_s), the distilled image
x'_{f_i^l}(x, x_s) looks like x_s but has f_i's layer-l features of x (`dvtrain.distill`, the seed
report's eq. 1). Entry (i, j) of the matrix is

    D[i, j] = mean over pairs of CE(f_j(x'_{f_i^l}(x, x_s)), y)      (y: the label of x, the *target*)

so a small D[i, j] means f_j, too, reads x's features in f_i's distilled image: their vulnerabilities
overlap. The seed report's eq. 2 is d(f_i, f_j) = (D[i, i] + D[i, j]) / 2. Protocol of the DVERGE
paper's diversity matrix (Yang et al., NeurIPS 2020, Fig. 3; the authors' eval/eval_diversity.py):
pairs drawn from test images that every submodel classifies correctly, batches of 10, a random layer
per batch, distillation as in training (ε, steps, step size, momentum) with the models in eval mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain.config import Config, DiversityConfig, DvergeConfig
from dvtrain.data import Dataset
from dvtrain.distill import distill
from dvtrain.rng import stream

PLOTS_DIR = "plots"
DPI = 120
CELL_INCHES = 0.9  # heat-map cell size, so the numbers written in the cells stay legible
MIN_SIDE_INCHES = 3.5
HEATMAP_COLORS = "Blues"


def distillation_settings(cfg: Config, stage: str) -> DvergeConfig:
    """The stage's own distillation settings (its dverge / dverge_advt section; the dverge section for
    the other stages), with eval.diversity's overrides, no random start and BatchNorm in eval mode."""
    section: DvergeConfig = getattr(cfg, stage) if stage in ("dverge", "dverge_advt") else cfg.dverge
    div = cfg.eval.diversity
    overrides = {k: getattr(div, k) for k in ("eps", "step_size", "steps") if getattr(div, k) is not None}
    return dataclasses.replace(section, bn_mode="eval", random_start=False, **overrides)


def diversity_matrix(
    submodels: list[nn.Module], x: Tensor, y: Tensor, x_s: Tensor, distillation: DvergeConfig, cfg: DiversityConfig,
    generator: torch.Generator,
) -> list[list[float]]:
    """D [M][M] (nats): D[i][j] = mean over the pairs of CE(f_j(x'_{f_i^l}(x, x_s)), y).

    x, x_s: [N, C, H, W] in [0, 1] (target and source images), y: [N] the targets' labels. Batches of
    `cfg.batch_size` pairs, each at `cfg.layer` or at a layer drawn from `generator`, uniformly over the
    submodels' layers 1..num_layers (all submodels share the architecture). Submodels must be in eval
    mode; none is modified. Raises ValueError if x is empty.
    """
    if len(y) == 0:
        raise ValueError("the diversity matrix needs at least one image pair")
    size, layers = len(submodels), submodels[0].num_layers
    total = torch.zeros(size, size, dtype=torch.float64)
    for start in range(0, len(y), cfg.batch_size):
        xb, yb, sb = x[start : start + cfg.batch_size], y[start : start + cfg.batch_size], x_s[start : start + cfg.batch_size]
        layer = cfg.layer if cfg.layer is not None else int(torch.randint(1, layers + 1, (), generator=generator))
        for i, source in enumerate(submodels):
            distilled = distill(source, layer, xb, sb, distillation, generator)
            with torch.no_grad():
                for j, model in enumerate(submodels):
                    total[i, j] += F.cross_entropy(model(distilled), yb, reduction="sum").double().cpu()
    return (total / len(y)).tolist()


def image_pairs(submodels: list[nn.Module], data: Dataset, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, x_s): n target images with labels and n source images, two independent random orders of the
    test images that every submodel classifies correctly (fewer if there are fewer such images)."""
    with torch.no_grad():
        correct = torch.stack([m(data.x_test).argmax(1) == data.y_test for m in submodels]).all(0)
    pool = correct.nonzero().squeeze(1).cpu()
    targets = pool[torch.randperm(len(pool), generator=generator)][:n].to(data.y_test.device)
    sources = pool[torch.randperm(len(pool), generator=generator)][:n].to(data.y_test.device)
    return data.x_test[targets], data.y_test[targets], data.x_test[sources]


def stage_diversity(stage: str, submodels: list[nn.Module], data: Dataset, cfg: Config) -> dict:
    """results["diversity"][stage]: {"models", "matrix" (D, nats), "metric" (eq. 2's d), "n_images", "protocol"}
    (matrix and metric None when no test image is classified correctly by every submodel).
    The pairs and layers come from the run's seed alone, so every stage is measured on the same pairs
    when its submodels classify the same images correctly."""
    div, distillation = cfg.eval.diversity, distillation_settings(cfg, stage)
    generator = stream(cfg.seed, "diversity")
    x, y, x_s = image_pairs(submodels, data, div.num_images, generator)
    protocol = {"eps": distillation.eps, "step_size": distillation.step_size, "steps": distillation.steps,
                "momentum": distillation.momentum, "batch_size": div.batch_size, "layer": div.layer, "bn_mode": "eval"}
    if len(y) == 0:  # no test image that every submodel classifies correctly: nothing to measure
        return {"models": [f"sub{i}" for i in range(len(submodels))], "matrix": None, "metric": None,
                "n_images": 0, "protocol": protocol}
    matrix = diversity_matrix(submodels, x, y, x_s, distillation, div, generator)
    metric = [[(row[i] + row[j]) / 2 for j in range(len(row))] for i, row in enumerate(matrix)]
    return {"models": [f"sub{i}" for i in range(len(submodels))], "matrix": matrix, "metric": metric,
            "n_images": len(y), "protocol": protocol}


def diversity_heatmap(entry: dict, title: str, path: Path) -> Path:
    """A heat map of D (rows: the submodel distilled on, columns: the submodel scored), values written in
    the cells; matplotlib's object API on the Agg canvas (no pyplot, no display). Returns `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"Submodel {int(m.removeprefix('sub')) + 1}" for m in entry["models"]]
    values = entry["matrix"]
    side = max(MIN_SIDE_INCHES, CELL_INCHES * (len(labels) + 1))
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap=HEATMAP_COLORS)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("scored by (f_j)")
    ax.set_ylabel("distilled on (f_i)")
    middle = (min(map(min, values)) + max(map(max, values))) / 2
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > middle else "black")
    fig.colorbar(image, ax=ax, label="cross-entropy with the target label (nats)")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def diversity_evaluation(run_dir: Path, stages: dict[str, list[nn.Module]], data: Dataset, cfg: Config, results: dict) -> None:
    """Every stage's matrix into results["diversity"] and its heat map under RUN_DIR/plots/ (path relative
    to the run in the entry's "plot"); nothing when eval.diversity.enabled is false."""
    if not cfg.eval.diversity.enabled:
        return
    for stage, submodels in stages.items():
        print(f"[eval {stage}] vulnerability-diversity matrix", flush=True)
        entry = stage_diversity(stage, submodels, data, cfg)
        if entry["matrix"] is not None:
            path = diversity_heatmap(entry, f"{stage}: vulnerability diversity",
                                     Path(run_dir) / PLOTS_DIR / f"diversity_{stage}.png")
            entry["plot"] = path.relative_to(run_dir).as_posix()
        results.setdefault("diversity", {})[stage] = entry
