"""The vulnerability-diversity matrix of an ensemble: how much the submodels share non-robust features.

For submodels f_i, f_j, a layer l and a pair of images (x, y), (x_s, y_s), the distilled image
x'_{f_i^l}(x, x_s) looks like x_s but has f_i's layer-l features of x (`dvtrain.distill`, the seed
report's eq. 1). Entry (i, j) of the matrix is

    D[i, j] = mean over pairs of CE(f_j(x'_{f_i^l}(x, x_s)), y)      (y: the label of x, the *target*)

so a small D[i, j] means f_j, too, reads x's features in f_i's distilled image: their vulnerabilities
overlap. The DVERGE paper's eq. 2 is symmetric, d(f_i, f_j) = ½ (L_{f_i}(x'_{f_j}) + L_{f_j}(x'_{f_i})) =
(D[j, i] + D[i, j]) / 2 (stored as "metric"; the seed report prints D[i, i] in its first term, a slip that
its next sentence contradicts: see docs/evaluation.md). Protocol of the DVERGE
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
from tqdm import tqdm

from dvtrain.config import Config, DiversityConfig, DvergeConfig
from dvtrain.data import Dataset
from dvtrain.distill import distill
from dvtrain.eval.report import format_eps
from dvtrain.eval.share import Share, Tasks, is_main
from dvtrain.rng import stream
from dvtrain.stages import distils

PLOTS_DIR = "plots"
# How "metric" was formed, so a reader can tell it from results of dvtrain before issue 26, which stored the
# seed report's printed (D[i][i] + D[i][j]) / 2 under the same key.
METRIC_FORM = "eq2_symmetric"


def distillation_settings(cfg: Config, stage: str) -> DvergeConfig:
    """The stage's own distillation settings (its dverge / dverge_advt section; the dverge section for
    the other stages), with eval.diversity's overrides, no random start and BatchNorm in eval mode."""
    section: DvergeConfig = cfg.section(stage) if distils(stage) else cfg.dverge
    div = cfg.eval.diversity
    overrides = {k: getattr(div, k) for k in ("eps", "step_size", "steps") if getattr(div, k) is not None}
    return dataclasses.replace(section, bn_mode="eval", random_start=False, **overrides)


def diversity_matrix(
    submodels: list[nn.Module], x: Tensor, y: Tensor, x_s: Tensor, distillation: DvergeConfig, cfg: DiversityConfig,
    generator: torch.Generator,
) -> list[list[float]]:
    """D [M][M] (nats): D[i][j] = mean over the pairs of CE(f_j(x'_{f_i^l}(x, x_s)), y), in this process.

    x, x_s: [N, C, H, W] in [0, 1] (target and source images), y: [N] the targets' labels. Batches of
    `cfg.batch_size` pairs, each at `cfg.layer` or at a layer drawn from `generator` (`batch_layers`).
    Submodels must be in eval mode; none is modified. Raises ValueError if x is empty.
    """
    if len(y) == 0:
        raise ValueError("the diversity matrix needs at least one image pair")
    if distillation.random_start:  # the rows are computed apart, each without the shared generator
        raise ValueError("the diversity matrix distills without a random start; pass distillation_settings(...)")
    layers = batch_layers(submodels[0].num_layers, len(y), cfg, generator)
    return [diversity_row(submodels, i, x, y, x_s, distillation, cfg, layers) for i in range(len(submodels))]


def batch_layers(num_layers: int, n_pairs: int, cfg: DiversityConfig, generator: torch.Generator) -> list[int]:
    """The layer of each batch of `cfg.batch_size` pairs: `cfg.layer`, or drawn from `generator`, uniformly
    over the layers 1..num_layers (all submodels share the architecture). Drawn up front, so that each
    row of the matrix can be computed on its own (distillation without a random start draws nothing)."""
    batches = range(0, n_pairs, cfg.batch_size)
    if cfg.layer is not None:
        return [cfg.layer for _ in batches]
    return [int(torch.randint(1, num_layers + 1, (), generator=generator)) for _ in batches]


def diversity_row(submodels: list[nn.Module], i: int, x: Tensor, y: Tensor, x_s: Tensor, distillation: DvergeConfig,
                  cfg: DiversityConfig, layers: list[int]) -> list[float]:
    """Row i of D (nats): the images distilled on submodel i at each batch's layer in `layers`, scored by
    every submodel j as mean CE(f_j(x'), y). Shapes as in `diversity_matrix`."""
    total = torch.zeros(len(submodels), dtype=torch.float64)
    for layer, start in zip(layers, range(0, len(y), cfg.batch_size)):
        xb, yb, sb = x[start : start + cfg.batch_size], y[start : start + cfg.batch_size], x_s[start : start + cfg.batch_size]
        distilled = distill(submodels[i], layer, xb, sb, distillation, torch.Generator(device=xb.device))
        with torch.no_grad():
            for j, model in enumerate(submodels):
                total[j] += F.cross_entropy(model(distilled), yb, reduction="sum").double().cpu()
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


def stage_pairs(stage: str, submodels: list[nn.Module], data: Dataset, cfg: Config) -> dict:
    """A stage's image pairs, batch layers and distillation settings (what each row of its matrix needs).
    The pairs and layers come from the run's seed alone, so every stage is measured on the same pairs
    when its submodels classify the same images correctly."""
    div, distillation = cfg.eval.diversity, distillation_settings(cfg, stage)
    generator = stream(cfg.seed, "diversity")
    x, y, x_s = image_pairs(submodels, data, div.num_images, generator)
    return {"x": x, "y": y, "x_s": x_s, "distillation": distillation,
            "layers": batch_layers(submodels[0].num_layers, len(y), div, generator)}


def stage_entry(submodels: list[nn.Module], pairs: dict, matrix: list[list[float]] | None, cfg: DiversityConfig) -> dict:
    """results["diversity"][stage]: {"models", "matrix" (D, nats), "metric" (eq. 2's symmetric d, nats:
    metric[i][j] = (D[i][j] + D[j][i]) / 2), "metric_form", "n_images", "protocol"} (matrix and metric None
    when no test image is classified correctly by every submodel)."""
    d = pairs["distillation"]
    protocol = {"eps": d.eps, "step_size": d.step_size, "steps": d.steps, "momentum": d.momentum,
                "batch_size": cfg.batch_size, "layer": cfg.layer, "bn_mode": "eval"}
    metric = None if matrix is None else symmetric_diversity(matrix)
    return {"models": [f"sub{i}" for i in range(len(submodels))], "matrix": matrix, "metric": metric,
            "metric_form": METRIC_FORM,
            "n_images": len(pairs["y"]), "protocol": protocol}


def symmetric_diversity(matrix: list[list[float]]) -> list[list[float]]:
    """d [M][M] (nats) of the DVERGE paper's eq. 2 (Yang et al., NeurIPS 2020):
    d(f_i, f_j) = ½ (CE(f_i(x'_{f_j}), y) + CE(f_j(x'_{f_i}), y)) = (D[j][i] + D[i][j]) / 2, symmetric in i, j."""
    return [[(matrix[i][j] + matrix[j][i]) / 2 for j in range(len(matrix))] for i in range(len(matrix))]


def stage_diversity(stage: str, submodels: list[nn.Module], data: Dataset, cfg: Config) -> dict:
    """One stage's results["diversity"] entry (`stage_entry`), computed in this process."""
    return diversities({stage: submodels}, data, cfg)[stage]


def diversities(stages: dict[str, list[nn.Module]], data: Dataset, cfg: Config, share: Share | None = None,
                bar: tqdm | None = None) -> dict[str, dict]:
    """Every stage's `stage_entry`; each row (stage, source submodel i) of each matrix is one task of
    `share` (None: all here), computed alike on any rank; `bar` counts this rank's rows' image pairs."""
    tasks, finish = diversity_work(stages, data, cfg)
    return finish(tasks.map(share, bar))


def diversity_work(stages: dict[str, list[nn.Module]], data: Dataset,
                   cfg: Config) -> tuple[Tasks, Callable[[list], dict[str, dict]]]:
    """`diversities` as work to share: a task per (stage, row) and the function that makes the entries of
    their results (in task order)."""
    pairs = {stage: stage_pairs(stage, subs, data, cfg) for stage, subs in stages.items()}
    # Every (stage, row) is a task of equal cost, from the config alone: the number of pairs comes from
    # each rank's own forward passes, which must not decide who does what.
    tasks = [(stage, i) for stage, subs in stages.items() for i in range(len(subs))]

    def row(task: tuple[str, int]) -> list[float] | None:
        stage, i = task
        p = pairs[stage]
        if len(p["y"]) == 0:  # no pair that every submodel classifies correctly: nothing to measure
            return None
        return diversity_row(stages[stage], i, p["x"], p["y"], p["x_s"], p["distillation"], cfg.eval.diversity, p["layers"])

    def finish(done: list) -> dict[str, dict]:
        rows = dict(zip(tasks, done))
        return {stage: stage_entry(subs, pairs[stage], [rows[(stage, i)] for i in range(len(subs))] if len(pairs[stage]["y"]) else None,
                                   cfg.eval.diversity)
                for stage, subs in stages.items()}

    n_pairs = [len(pairs[stage]["y"]) for stage, _ in tasks]
    return Tasks(tasks, [1.0] * len(tasks), row, n_pairs, "vulnerability-diversity matrices"), finish


def diversity_range(entries: dict[str, dict]) -> tuple[float, float]:
    """(lowest, highest) D over every stage's matrix: the one colour scale of all the heat maps of a run,
    so equal colours mean equal nats across stages. (0, 1) when no entry has a matrix."""
    values = [v for entry in entries.values() if entry.get("matrix") for row in entry["matrix"] for v in row]
    return (min(values), max(values)) if values else (0.0, 1.0)


def diversity_basis(entry: dict) -> str:
    """What a diversity matrix measured, in one line: pairs, layer, distillation budget."""
    p = entry["protocol"]
    layer = f"layer {p['layer']}" if p.get("layer") else "a random layer per batch"
    return (f"{entry['n_images']} test-image pairs every submodel classifies correctly, {layer}, distillation "
            f"ε={format_eps(p['eps'])}, {p['steps']} steps of {p['step_size']:g}")


def diversity_heatmap(entry: dict, title: str, path: Path, value_range: tuple[float, float]) -> Path:
    """A heat map of D (rows: the submodel distilled on, columns: the submodel scored), values written in
    the cells, coloured on `value_range` (nats: `diversity_range` of every stage shown beside it), titled
    `title` over the entry's basis (`diversity_basis`); drawn in `dvtrain.figure_style`. Returns `path`."""
    from dvtrain import figure_style as style
    from dvtrain.eval.plots import wrap

    labels = [f"Submodel {int(m.removeprefix('sub')) + 1}" for m in entry["models"]]
    values = entry["matrix"]
    width, height = style.heatmap_size(len(labels), len(labels))
    fig = style.new_figure(width, height)
    ax = fig.add_subplot()
    low, high = value_range
    image = ax.imshow(values, cmap=style.DIVERSITY_COLORS, vmin=low, vmax=high)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("scored by (f_j)")
    ax.set_ylabel("distilled on (f_i)")
    middle = (low + high) / 2
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > middle else "black")
    fig.colorbar(image, ax=ax, label="cross-entropy with the target label (nats)\n"
                                     "off-diagonal: higher is more diverse (better)")
    fig.suptitle(title)
    ax.set_title(wrap(diversity_basis(entry), width), fontsize=style.SMALL)
    return style.save(fig, path)


def diversity_plots(run_dir: Path, results: dict) -> None:
    """Every stage's heat map of results["diversity"] (results.json as merged: this evaluation's stages and
    earlier ones) under RUN_DIR/plots/, all on one colour scale (`diversity_range`), each path relative to
    the run recorded in its entry's "plot"."""
    entries = {stage: e for stage, e in results.get("diversity", {}).items() if e.get("matrix") is not None}
    value_range = diversity_range(entries)
    for stage, entry in entries.items():
        path = diversity_heatmap(entry, f"{stage}: vulnerability diversity",
                                 Path(run_dir) / PLOTS_DIR / f"diversity_{stage}.png", value_range)
        entry["plot"] = path.relative_to(run_dir).as_posix()


def diversity_evaluation(stages: dict[str, list[nn.Module]], data: Dataset, cfg: Config, results: dict,
                         share: Share | None = None, bar: tqdm | None = None) -> None:
    """Every stage's matrix into results["diversity"], rows shared out by `share` and written by rank 0;
    nothing when eval.diversity.enabled is false. The heat maps are `diversity_plots`' (drawn once the
    entries are merged with the run's earlier ones, so that every stage shares one colour scale)."""
    if not cfg.eval.diversity.enabled:
        return
    if is_main(share):
        print(f"[eval] vulnerability-diversity matrices: {', '.join(stages)}", flush=True)
    entries = diversities(stages, data, cfg, share, bar)
    if not is_main(share):
        return
    for stage, entry in entries.items():
        results.setdefault("diversity", {})[stage] = entry
