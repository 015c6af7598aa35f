"""Transferability between submodels (the paper's §5; accuracy against ε is `dvtrain.eval.sweep`).

DVERGE's claim is about transfer: an adversarial example of one submodel should not fool the others.
Protocols (see docs/evaluation.md) follow the paper (Yang et al., NeurIPS 2020, §5) and the authors'
evaluation code (github zjysteven/DVERGE, eval/*.py, read but not copied: it has no licence). Every
attack draws its random numbers from a stream named after the seed and what it attacks
(`dvtrain.rng.stream`), so each number is reproducible on its own. Models are expected in eval mode
(the caller sets it), as at test time. The shared pieces here (`fooled`, `percent`, `ensemble_predictions`,
`shuffled_test_set`) serve `dvtrain.eval.blackbox` too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dvtrain.config import TransferConfig
from dvtrain.data import Dataset
from dvtrain.attacks import pgd_linf
from dvtrain.eval.share import Share, Tasks
from dvtrain.mixture import Mixture, mixture_log_probs
from dvtrain.rng import stream

PERCENT = 100.0


# ----------------------------------------------------------------------------- shared pieces


def percent(mask: Tensor) -> float | None:
    """Share of true entries in percent; None for no images (JSON has no NaN)."""
    return float(mask.double().mean() * PERCENT) if mask.numel() else None


@torch.no_grad()
def ensemble_predictions(submodels: list[nn.Module], x: Tensor) -> Tensor:
    """Predicted classes [M + 1, N]: each submodel, then the mixture (from the same forwards)."""
    logits = torch.stack([model(x) for model in submodels])
    return torch.cat([logits.argmax(dim=2), mixture_log_probs(logits).argmax(dim=1)[None]])


def fooled_by(
    attack: Callable[[Tensor, Tensor, torch.Generator], Tensor],
    predict: Callable[[Tensor], Tensor],
    n_targets: int,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generators: list[torch.Generator],
) -> Tensor:
    """[n_targets, N]: whether any run of `attack` (one generator per run) fools each target of `predict`.

    Runs are restarts: an image is robust only if it is classified correctly under all of them,
    as the reference counts restarts. Batches draw from a run's generator in order."""
    fooled = torch.zeros(n_targets, len(y), dtype=torch.bool, device=y.device)
    for generator in generators:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            fooled[:, start : start + batch_size] |= predict(attack(xb, yb, generator)) != yb
    return fooled


def table_models(submodels: list[nn.Module]) -> dict[str, nn.Module]:
    """sub0..sub{M-1} and the mixture: the rows of every table."""
    return {f"sub{i}": m for i, m in enumerate(submodels)} | {"mixture": Mixture(submodels)}


def shuffled_test_set(data: Dataset, seed: int) -> tuple[Tensor, Tensor]:
    """The test set in a seeded random order: its first N images are the reference's random N."""
    order = torch.randperm(len(data.y_test), generator=stream(seed, "eval", "images")).to(data.y_test.device)
    return data.x_test[order], data.y_test[order]


def first(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return (x, y) if n == 0 else (x[:n], y[:n])


# ----------------------------------------------------------------------------- transferability


def correct_by_all(submodels: list[nn.Module], x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Mask of the images every submodel classifies correctly (then the mixture does too)."""
    right = [
        (ensemble_predictions(submodels, x[s : s + batch_size])[:-1] == y[s : s + batch_size]).all(dim=0)
        for s in range(0, len(y), batch_size)
    ]
    return torch.cat(right)


def transfer_matrices(stages: dict[str, list[nn.Module]], x: Tensor, y: Tensor, cfg: TransferConfig, seed: int,
                      share: Share | None = None, bar: tqdm | None = None) -> dict[str, dict]:
    """Per stage: PGD-L∞ crafted on submodel i; success rate (% misclassified) on submodel j and on the mixture.

    `stages`: stage name → its submodels (eval mode); x [N, C, H, W] in [0, 1], y [N]. As the reference
    does, only images that all of a stage's submodels classify correctly are attacked (the first
    `cfg.num_images` of them in x's order), so a success is always caused by the perturbation; an image
    counts as fooled if any of `cfg.restarts` runs fools it. The diagonal is submodel i's white-box PGD
    success on those images. Each (stage, source, restart) run is one task of `share` (None: all here),
    with its own stream, so the matrices do not depend on the number of processes; `bar` counts this
    rank's runs' images."""
    tasks, finish = transfer_work(stages, x, y, cfg, seed)
    return finish(tasks.map(share, bar))


def transfer_work(stages: dict[str, list[nn.Module]], x: Tensor, y: Tensor, cfg: TransferConfig,
                  seed: int) -> tuple[Tasks, Callable[[list], dict[str, dict]]]:
    """`transfer_matrices` as work to share: its tasks (one per (stage, source submodel, restart), each a
    [M + 1, n] fooled mask) and the function that makes the matrices of their results (in task order)."""
    picked = {}
    for stage, submodels in stages.items():
        keep = correct_by_all(submodels, x, y, cfg.batch_size)
        picked[stage] = first(x[keep], y[keep], cfg.num_images)
    tasks = [(stage, i, r) for stage, subs in stages.items() for i in range(len(subs)) for r in range(cfg.restarts)]

    def run(task: tuple[str, int, int]) -> Tensor:
        stage, i, r = task
        submodels, (xs, ys) = stages[stage], picked[stage]
        return fooled_by(_random_start_pgd(submodels[i], cfg.eps, cfg), lambda a: ensemble_predictions(submodels, a),
                         len(submodels) + 1, xs, ys, cfg.batch_size, [stream(seed, "transfer", f"sub{i}", r)]).cpu()

    costs = [float(cfg.steps)] * len(tasks)  # alike for every run, from the config: every rank assigns alike
    images = [len(picked[stage][1]) for stage, _, _ in tasks]
    return Tasks(tasks, costs, run, images, "transferability matrices"), lambda done: _matrices(stages, picked, tasks, done, cfg)


def _matrices(stages: dict[str, list[nn.Module]], picked: dict[str, tuple[Tensor, Tensor]], tasks: list[tuple[str, int, int]],
              done: list[Tensor], cfg: TransferConfig) -> dict[str, dict]:
    fooled = dict(zip(tasks, done))
    out = {}
    for stage, submodels in stages.items():
        names = [f"sub{i}" for i in range(len(submodels))]
        success = []
        for i in range(len(submodels)):
            runs = torch.stack([fooled[(stage, i, r)] for r in range(cfg.restarts)]).any(dim=0)
            success.append([percent(row) for row in runs])
        out[stage] = {"eps": cfg.eps, "steps": cfg.steps, "step_fraction": cfg.step_fraction, "restarts": cfg.restarts,
                      "num_images": cfg.num_images, "n_images": len(picked[stage][1]), "sources": names, "targets": [*names, "mixture"],
                      "success": success}
    return out


def transfer_matrix(submodels: list[nn.Module], x: Tensor, y: Tensor, cfg: TransferConfig, seed: int) -> dict:
    """`transfer_matrices` of one ensemble, in this process: its results.json "transfer" entry."""
    return transfer_matrices({"": submodels}, x, y, cfg, seed)[""]


def _random_start_pgd(model: nn.Module, eps: float, cfg: TransferConfig) -> Callable[[Tensor, Tensor, torch.Generator], Tensor]:
    """One random-start run of dvtrain's PGD-L∞ at eps, with cfg's steps and relative step size."""
    return lambda x, y, g: pgd_linf(model, x, y, eps, cfg.step_fraction * eps, cfg.steps, True, g)
