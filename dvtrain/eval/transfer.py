"""The paper's evaluation beyond the white-box table: transferability between submodels, black-box
transfer from a separately trained surrogate ensemble, and accuracy against the attack budget.

DVERGE's claim is about transfer: an adversarial example of one submodel should not fool the others,
and an attack crafted elsewhere should not fool the mixture. Protocols (see docs/evaluation.md) follow
the paper (Yang et al., NeurIPS 2020, §5) and the authors' evaluation code (github zjysteven/DVERGE,
eval/*.py, read but not copied: it has no licence). Every attack draws its random numbers from a
stream named after the seed and what it attacks (`dvtrain.rng.stream`), so each number is
reproducible on its own. Models are expected in eval mode (the caller sets it), as at test time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvtrain import checkpoint
from dvtrain.eval.apgd import apgd_ce
from dvtrain.eval.attacks import _input_grad, _noise, _per_sample, pgd_linf, project_linf
from dvtrain.config import STAGES, Config, EvalConfig, TransferConfig, check_section, to_dict
from dvtrain.data import Dataset, load_dataset
from dvtrain.submodels import Owned
from dvtrain.train.optim import build_owned, set_epoch_lr
from dvtrain.errors import DvtrainError
from dvtrain.eval.whitebox import _HEADERS, _format_eps, _model_label, evaluate_stage
from dvtrain.mixture import Mixture, mixture_log_probs
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.timing import DISABLED
from dvtrain.train.stage import StageRun
from dvtrain.train.vanilla import Vanilla
from dvtrain.rng import derive_seed, stream

SURROGATE_DIR = "surrogates"
APGD = "apgd_ce"
WHITEBOX_ATTACKS = ("clean", "fgsm", "pgd_linf", "pgd_l2", APGD)
MI_PGD = "mi_pgd"  # momentum PGD (MI-FGSM's update with a random start and restarts)
M_DI2_FGSM = "m_di2_fgsm"  # momentum + diverse inputs
ALL_ATTACKS = "all"  # correct under every transferred example: the reference's "all" column
BLACKBOX_PREFIX = "bb_"
TRANSFER_OFFDIAG = "transfer_offdiag"
FULL_EVALUATION_KEYS = ("transfer", "blackbox", "eps_sweep")  # results.json keys only full_evaluation writes
PERCENT = 100.0
HEADERS = {**_HEADERS, APGD: "APGD-CE"}


# ----------------------------------------------------------------------------- shared pieces


def _percent(mask: Tensor) -> float | None:
    """Share of true entries in percent; None for no images (JSON has no NaN)."""
    return float(mask.double().mean() * PERCENT) if mask.numel() else None


@torch.no_grad()
def ensemble_predictions(submodels: list[nn.Module], x: Tensor) -> Tensor:
    """Predicted classes [M + 1, N]: each submodel, then the mixture (from the same forwards)."""
    logits = torch.stack([model(x) for model in submodels])
    return torch.cat([logits.argmax(dim=2), mixture_log_probs(logits).argmax(dim=1)[None]])


def _fooled(
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


def _models(submodels: list[nn.Module]) -> dict[str, nn.Module]:
    """sub0..sub{M-1} and the mixture: the rows of every table."""
    return {f"sub{i}": m for i, m in enumerate(submodels)} | {"mixture": Mixture(submodels)}


def _own_prediction(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x).argmax(dim=1)[None]


def shuffled_test_set(data: Dataset, seed: int) -> tuple[Tensor, Tensor]:
    """The test set in a seeded random order: its first N images are the reference's random N."""
    order = torch.randperm(len(data.y_test), generator=stream(seed, "eval", "images")).to(data.y_test.device)
    return data.x_test[order], data.y_test[order]


def _first(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return (x, y) if n == 0 else (x[:n], y[:n])


# ----------------------------------------------------------------------------- white box


def apgd_rows(
    stage: str, submodels: list[nn.Module], x: Tensor, y: Tensor, eval_cfg: EvalConfig, cfg: TransferConfig, seed: int
) -> list[dict]:
    """APGD-CE rows at eval.eps on the white-box table's images, in `evaluate_stage`'s row schema."""
    x, y = _first(x, y, eval_cfg.num_examples)
    rows = []
    for name, model in _models(submodels).items():
        def attack(xb: Tensor, yb: Tensor, g: torch.Generator, model: nn.Module = model) -> Tensor:
            return apgd_ce(model, xb, yb, eval_cfg.eps, cfg.apgd_steps, cfg.apgd_restarts, g)

        with torch.no_grad():
            fooled = _fooled(attack, _own_prediction(model), 1, x, y, eval_cfg.batch_size, [stream(seed, "eval", name, APGD)])
        rows.append({"stage": stage, "model": name, "attack": APGD, "eps": float(eval_cfg.eps),
                     "accuracy": PERCENT - _percent(fooled[0])})
    return rows


def whitebox_rows(
    stage: str, submodels: list[nn.Module], x: Tensor, y: Tensor, eval_cfg: EvalConfig, cfg: TransferConfig, seed: int
) -> list[dict]:
    """The training-time table (clean, FGSM, PGD-L∞, PGD-L2) plus APGD-CE, for each submodel and the mixture."""
    rows = evaluate_stage(stage, submodels, x, y, eval_cfg, seed) + apgd_rows(stage, submodels, x, y, eval_cfg, cfg, seed)
    models = list(_models(submodels))
    return sorted(rows, key=lambda r: (models.index(r["model"]), WHITEBOX_ATTACKS.index(r["attack"])))


# ----------------------------------------------------------------------------- transferability


def correct_by_all(submodels: list[nn.Module], x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Mask of the images every submodel classifies correctly (then the mixture does too)."""
    right = [
        (ensemble_predictions(submodels, x[s : s + batch_size])[:-1] == y[s : s + batch_size]).all(dim=0)
        for s in range(0, len(y), batch_size)
    ]
    return torch.cat(right)


def transfer_matrix(submodels: list[nn.Module], x: Tensor, y: Tensor, cfg: TransferConfig, seed: int) -> dict:
    """PGD-L∞ crafted on submodel i; success rate (% misclassified) on submodel j and on the mixture.

    As the reference does, only images that all submodels classify correctly are attacked (the first
    `cfg.num_images` of them in x's order), so a success is always caused by the perturbation. The
    diagonal is submodel i's white-box PGD success on those images."""
    keep = correct_by_all(submodels, x, y, cfg.batch_size)
    x, y = _first(x[keep], y[keep], cfg.num_images)
    success = []
    for i, source in enumerate(submodels):
        runs = [stream(seed, "transfer", f"sub{i}", r) for r in range(cfg.restarts)]
        fooled = _fooled(_random_start_pgd(source, cfg.eps, cfg), lambda a: ensemble_predictions(submodels, a),
                         len(submodels) + 1, x, y, cfg.batch_size, runs)
        success.append([_percent(row) for row in fooled])
    names = [f"sub{i}" for i in range(len(submodels))]
    return {"eps": cfg.eps, "steps": cfg.steps, "step_fraction": cfg.step_fraction, "restarts": cfg.restarts,
            "n_images": len(y), "sources": names, "targets": [*names, "mixture"], "success": success}


def _random_start_pgd(model: nn.Module, eps: float, cfg: TransferConfig) -> Callable[[Tensor, Tensor, torch.Generator], Tensor]:
    """One random-start run of dvtrain's PGD-L∞ at eps, with cfg's steps and relative step size."""
    return lambda x, y, g: pgd_linf(model, x, y, eps, cfg.step_fraction * eps, cfg.steps, True, g)


def mean_off_diagonal(matrix: dict) -> float | None:
    """Mean success of submodel i's examples on the other submodels j ≠ i: the number DVERGE lowers."""
    m = len(matrix["sources"])
    values = [matrix["success"][i][j] for i in range(m) for j in range(m) if i != j]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- ε sweep


def epsilon_sweep(submodels: list[nn.Module], x: Tensor, y: Tensor, cfg: TransferConfig, seed: int) -> dict:
    """Accuracy (%) of each submodel and the mixture under white-box PGD-L∞ at every ε of cfg.sweep_eps."""
    models = _models(submodels)
    accuracy = []
    for name, model in models.items():
        row = []
        for eps in cfg.sweep_eps:
            runs = [stream(seed, "sweep", name, eps, r) for r in range(cfg.restarts)]
            with torch.no_grad():
                fooled = _fooled(_random_start_pgd(model, eps, cfg), _own_prediction(model), 1, x, y, cfg.batch_size, runs)
            row.append(PERCENT - _percent(fooled[0]) if len(y) else None)
        accuracy.append(row)
    return {"eps": list(cfg.sweep_eps), "steps": cfg.steps, "step_fraction": cfg.step_fraction,
            "restarts": cfg.restarts, "n_images": len(y), "models": list(models), "accuracy": accuracy}


# ----------------------------------------------------------------------------- black box: surrogates


def surrogate_config(cfg: Config, tcfg: TransferConfig) -> Config:
    """The run's own architecture and vanilla recipe, with other seeds (derived from the run seed)."""
    epochs = cfg.vanilla.epochs if tcfg.surrogate_epochs is None else tcfg.surrogate_epochs
    return dataclasses.replace(
        cfg,
        seed=derive_seed(cfg.seed, "surrogate"),
        ensemble=dataclasses.replace(cfg.ensemble, size=tcfg.surrogate_size),
        vanilla=dataclasses.replace(cfg.vanilla, epochs=epochs),
    )


def _surrogate_identity(scfg: Config) -> dict:
    """What the cached weights depend on: a cache whose identity differs is retrained."""
    tree = to_dict(scfg)
    return {key: tree[key] for key in ("seed", "data", "model", "ensemble", "vanilla")}


def train_surrogates(scfg: Config, data: Dataset, device: torch.device) -> Owned:
    """Independently trained plain classifiers, exactly as dvtrain's vanilla stage trains its submodels."""
    ids = list(range(scfg.ensemble.size))
    owned = build_owned(scfg, data, ids, "vanilla", device)
    placement = LocalPlacement(scfg.ensemble.size)
    # Vanilla draws from per-submodel streams only: the shared generator is never consumed.
    run = StageRun("vanilla", scfg, owned, placement, placement.replicas, data, torch.Generator(), DISABLED)
    for epoch in range(scfg.vanilla.epochs):
        for i in ids:
            set_epoch_lr(owned.optimizers[i], scfg.vanilla.optim, epoch)
        Vanilla(run).epoch(epoch, 0, lambda figures, images: None)
    return owned


def load_or_train_surrogates(
    run_dir: Path, cfg: Config, tcfg: TransferConfig, data: Dataset, device: torch.device
) -> list[nn.Module]:
    """The surrogate ensemble cached under RUN_DIR/surrogates/ (safetensors), trained on first use."""
    scfg = surrogate_config(cfg, tcfg)
    identity = _surrogate_identity(scfg)
    path = Path(run_dir) / SURROGATE_DIR
    found = checkpoint.latest(path)
    if found is not None and checkpoint.read_state(found).get("surrogate") == identity:
        owned = build_owned(scfg, data, list(range(scfg.ensemble.size)), "vanilla", device)
        checkpoint.load_weights(found, owned)
    else:
        print(f"[eval] training the surrogate ensemble ({scfg.ensemble.size} × {scfg.model.arch}, "
              f"{scfg.vanilla.epochs} epochs) into {path}", flush=True)
        owned = train_surrogates(scfg, data, device)
        state = {"surrogate": identity, "complete": True, "epoch": scfg.vanilla.epochs}
        checkpoint.save_checkpoint(path, owned, LocalPlacement(scfg.ensemble.size), state)
    return [owned.models[i].eval() for i in owned.ids]


# ----------------------------------------------------------------------------- black box: attacks


class DiverseInputs(nn.Module):
    """model(T(x)) where, with probability `prob`, T scales x down by a random factor and pads it at a
    random place (Xie et al., CVPR 2019), resized back so fixed-size models accept it; differentiable."""

    def __init__(self, model: nn.Module, prob: float, resize: float, generator: torch.Generator):
        super().__init__()
        self.model, self.prob, self.resize, self.generator = model, prob, resize, generator

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def forward(self, x: Tensor) -> Tensor:
        if float(torch.rand(1, generator=self.generator)) >= self.prob:
            return self.model(x)
        size = x.shape[-1]
        padded_size = max(size + 1, round(size * self.resize))
        inner = self._randint(size, padded_size)
        top, left = self._randint(0, padded_size - inner + 1), self._randint(0, padded_size - inner + 1)
        small = F.interpolate(x, size=(inner, inner), mode="nearest")
        padded = F.pad(small, (left, padded_size - inner - left, top, padded_size - inner - top))
        return self.model(F.interpolate(padded, size=x.shape[-2:], mode="bilinear", align_corners=False))


def momentum_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int, momentum: float,
    random_start: bool, generator: torch.Generator,
) -> Tensor:
    """MI-FGSM's update (Dong et al., CVPR 2018): accumulate per-image L1-normalised gradients with
    decay `momentum`, step along the sign of the sum, project to the L∞ ball of x."""
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = (x + (2 * _noise(torch.rand, x.shape, x, generator) - 1) * eps).clamp(0.0, 1.0)
    velocity = torch.zeros_like(x)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y)
        velocity = momentum * velocity + grad / _per_sample(grad.abs().flatten(1).sum(1).clamp_min(tiny), grad)
        x_adv = project_linf(x_adv + step_size * velocity.sign(), x, eps)
    return x_adv.detach()


def blackbox_examples(surrogates: list[nn.Module], x: Tensor, y: Tensor, cfg: TransferConfig, seed: int) -> dict[str, list[Tensor]]:
    """Adversarial copies of x crafted on the surrogate Mixture (attacked end to end): attack → one per run.

    Momentum PGD: random start, steps of ε·step_fraction, `blackbox_restarts` runs. M-DI²-FGSM: no
    random start, steps of ε/steps (as MI-FGSM and DI²-FGSM), one run."""
    surrogate = Mixture(surrogates)
    mi_step, di_step = cfg.step_fraction * cfg.eps, cfg.eps / cfg.blackbox_steps
    out: dict[str, list[Tensor]] = {MI_PGD: [], M_DI2_FGSM: []}
    for r in range(cfg.blackbox_restarts):
        g = stream(seed, "blackbox", MI_PGD, r)
        out[MI_PGD].append(_batched(lambda xb, yb: momentum_pgd(
            surrogate, xb, yb, cfg.eps, mi_step, cfg.blackbox_steps, cfg.momentum, True, g), x, y, cfg.batch_size))
    g = stream(seed, "blackbox", M_DI2_FGSM)
    diverse = DiverseInputs(surrogate, cfg.di_prob, cfg.di_resize, g)
    out[M_DI2_FGSM].append(_batched(lambda xb, yb: momentum_pgd(
        diverse, xb, yb, cfg.eps, di_step, cfg.blackbox_steps, cfg.momentum, False, g), x, y, cfg.batch_size))
    return out


def _batched(attack: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat([attack(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size)])


def blackbox_table(submodels: list[nn.Module], examples: dict[str, list[Tensor]], y: Tensor, batch_size: int) -> dict:
    """Accuracy (%) of each submodel and the mixture on the transferred examples: per attack (correct
    under all its runs) and "all" (correct under every example of every attack)."""
    correct = {
        attack: torch.stack([_predict_all(submodels, adv, batch_size) == y for adv in runs]).all(dim=0)
        for attack, runs in examples.items()
    }
    correct[ALL_ATTACKS] = torch.stack(list(correct.values())).all(dim=0)
    models = [*(f"sub{i}" for i in range(len(submodels))), "mixture"]
    return {"attacks": list(correct), "models": models, "n_images": len(y),
            "accuracy": [[_percent(correct[a][m]) for a in correct] for m in range(len(models))]}


def _predict_all(submodels: list[nn.Module], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([ensemble_predictions(submodels, x[s : s + batch_size]) for s in range(0, len(x), batch_size)], dim=1)


# ----------------------------------------------------------------------------- the whole evaluation


def finished_stages(run_dir: Path, cfg: Config, stages: list[str] | None) -> list[str]:
    """The requested stages (all with a finished checkpoint when None); a requested unfinished one is an error."""
    def done(stage: str) -> bool:
        path = checkpoint.latest(checkpoint.stage_dir(run_dir, stage))
        return path is not None and bool(checkpoint.read_state(path).get("complete"))

    if stages is None:
        return [s for s in cfg.stages if done(s)]
    for stage in stages:
        if not done(stage):
            raise DvtrainError(f"stage {stage} has no finished checkpoint in {run_dir}; train it first")
    return list(stages)


def load_stage(run_dir: Path, cfg: Config, data: Dataset, stage: str, device: torch.device) -> list[nn.Module]:
    """Every submodel of a finished stage in one process, in eval mode."""
    owned = build_owned(cfg, data, list(range(cfg.ensemble.size)), stage, device)
    checkpoint.load_weights(checkpoint.latest(checkpoint.stage_dir(run_dir, stage)), owned)
    return [owned.models[i].eval() for i in owned.ids]


def evaluate_stage_fully(
    stage: str, submodels: list[nn.Module], data: Dataset, cfg: Config, tcfg: TransferConfig,
    bb_examples: dict[str, list[Tensor]], results: dict,
) -> None:
    """White-box table with APGD, transfer matrix, black-box table and ε sweep of one stage, into `results`.

    The white-box table uses the training-time evaluation's images (eval.num_examples); the others
    a seeded random draw of `tcfg.num_images` test images, the same for every stage."""
    x_pool, y_pool = shuffled_test_set(data, cfg.seed)
    x, y = _first(x_pool, y_pool, tcfg.num_images)
    print(f"[eval {stage}] white-box table with APGD-CE", flush=True)
    rows = whitebox_rows(stage, submodels, data.x_test, data.y_test, cfg.eval, tcfg, cfg.seed)
    results["eval"] = [r for r in results["eval"] if r["stage"] != stage] + rows
    print(f"[eval {stage}] transferability matrix", flush=True)
    results.setdefault("transfer", {})[stage] = transfer_matrix(submodels, x_pool, y_pool, tcfg, cfg.seed)
    print(f"[eval {stage}] black-box transfer", flush=True)
    results.setdefault("blackbox", {})[stage] = blackbox_table(submodels, bb_examples, y, tcfg.batch_size)
    print(f"[eval {stage}] accuracy vs ε", flush=True)
    results.setdefault("eps_sweep", {})[stage] = epsilon_sweep(submodels, x, y, tcfg, cfg.seed)


def prepare_blackbox(
    run_dir: Path, cfg: Config, tcfg: TransferConfig, data: Dataset, device: torch.device
) -> tuple[dict[str, list[Tensor]], dict]:
    """The transferred examples (crafted once, reused for every stage) and a description of their source:
    the surrogate mixture's clean accuracy and its own (white-box) accuracy under them."""
    x, y = _first(*shuffled_test_set(data, cfg.seed), tcfg.num_images)
    surrogates = load_or_train_surrogates(run_dir, cfg, tcfg, data, device)
    print("[eval] crafting black-box examples on the surrogate ensemble", flush=True)
    examples = blackbox_examples(surrogates, x, y, tcfg, cfg.seed)
    own = blackbox_table(surrogates, examples, y, tcfg.batch_size)
    info = {"size": tcfg.surrogate_size, "seed": surrogate_config(cfg, tcfg).seed, "eps": tcfg.eps,
            "steps": tcfg.blackbox_steps, "restarts": tcfg.blackbox_restarts, "n_images": len(y),
            "clean_accuracy": _percent(_predict_all(surrogates, x, tcfg.batch_size)[-1] == y),
            "attacks": own["attacks"], "accuracy": own["accuracy"][-1]}
    return examples, info


def full_evaluation(run_dir: Path, cfg: Config, stages: list[str] | None, device: torch.device,
                    tcfg: TransferConfig) -> dict:
    """The paper's whole evaluation of a run's finished stages (all of them when `stages` is None),
    written to results.json, results.md, plots/ and (per logging.wandb) a W&B run "<name>-eval".
    Single process: every submodel is loaded here, whatever world size trained them."""
    from dvtrain.eval.plots import evaluation_plots
    from dvtrain.train.loop import Context, load_results, save_results

    run_dir = Path(run_dir)
    check_section(tcfg, "eval.transfer.")
    stages = finished_stages(run_dir, cfg, stages)
    data = load_dataset(cfg.data).to(device)
    results = load_results(run_dir)
    examples, results["blackbox_surrogate"] = prepare_blackbox(run_dir, cfg, tcfg, data, device)
    for stage in stages:
        evaluate_stage_fully(stage, load_stage(run_dir, cfg, data, stage, device), data, cfg, tcfg, examples, results)
    results["plots"] = evaluation_plots(run_dir, results)
    save_results(Context(cfg, run_dir, data, LocalPlacement(cfg.ensemble.size), device), results)
    log_evaluation(cfg, run_dir, results)
    print(evaluation_markdown(results), flush=True)
    return results


# ----------------------------------------------------------------------------- reporting


def result_metrics(results: dict) -> dict[tuple[str, str, str], float]:
    """Every number of a results.json as (stage, model, metric) → value: white-box accuracies under
    their attack names, black-box accuracies as bb_<attack>, and the mixture row's transfer_offdiag
    (mean off-diagonal transfer *success*, lower is better). What `dvtrain compare` tabulates."""
    out = {(r["stage"], r["model"], r["attack"]): r["accuracy"] for r in results.get("eval", [])}
    for stage, table in results.get("blackbox", {}).items():
        for m, model in enumerate(table["models"]):
            for a, attack in enumerate(table["attacks"]):
                out[(stage, model, BLACKBOX_PREFIX + attack)] = table["accuracy"][m][a]
    for stage, matrix in results.get("transfer", {}).items():
        out[(stage, "mixture", TRANSFER_OFFDIAG)] = mean_off_diagonal(matrix)
    return {key: value for key, value in out.items() if value is not None}


def metric_key(stage: str, model: str, metric: str) -> str:
    """The W&B summary key of a number: eval/<stage>/<model>/<metric>."""
    return f"eval/{stage}/{model}/{metric}"


def log_evaluation(cfg: Config, run_dir: Path, results: dict) -> None:
    """A W&B run "<name>-eval" (job type eval): tables, plots as images, every number in the summary."""
    from dvtrain.tracking import Tracker

    tracker = Tracker(cfg.logging, run_dir, cfg.name, "eval", to_dict(cfg), active=True)
    if tracker.run is None:
        return
    import wandb

    exit_code = 1
    try:
        metrics = result_metrics(results)
        table = wandb.Table(columns=["stage", "model", "metric", "value"],
                            data=[[*key, value] for key, value in metrics.items()])
        logged: dict = {"eval/table": table}
        for stage, matrix in results.get("transfer", {}).items():
            logged[f"eval/{stage}/transfer_matrix"] = wandb.Table(
                columns=["source", *matrix["targets"]],
                data=[[s, *row] for s, row in zip(matrix["sources"], matrix["success"])],
            )
        for stage, files in results.get("plots", {}).items():
            logged.update({f"eval/{stage}/{kind}": wandb.Image(str(run_dir / rel)) for kind, rel in files.items()})
        tracker.run.log(logged)
        tracker.summary({metric_key(*key): value for key, value in metrics.items()})
        exit_code = 0
    finally:
        tracker.finish(exit_code)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _stage_order(stages) -> list[str]:
    return sorted(stages, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))


def _whitebox_markdown(rows: list[dict]) -> str:
    lines = []
    for stage in _stage_order({r["stage"] for r in rows}):
        cells = {(r["model"], r["attack"]): r for r in rows if r["stage"] == stage}
        attacks = [a for a in WHITEBOX_ATTACKS if any(a == attack for _, attack in cells)]
        models = list(dict.fromkeys(model for model, _ in cells))
        header = [f"{HEADERS[a]}{'' if a == 'clean' else ' ε=' + _format_eps(_eps_of(cells, a))} (%)" for a in attacks]
        lines += [f"### {stage}", "", "| Model | " + " | ".join(header) + " |", "|---" + "|---:" * len(attacks) + "|"]
        for m in models:
            lines.append("| " + " | ".join([_model_label(stage, m), *(_cell(cells.get((m, a), {}).get("accuracy"))
                                                                   for a in attacks)]) + " |")
        lines.append("")
    return "\n".join(lines)


def _eps_of(cells: dict, attack: str) -> float:
    return next(r["eps"] for (_, a), r in cells.items() if a == attack)


def _label(stage: str, name: str) -> str:
    return _model_label(stage, name) if name.startswith(("sub", "mixture")) else name


def _matrix_markdown(stage: str, rows: list[str], columns: list[str], values: list[list]) -> list[str]:
    lines = ["| | " + " | ".join(_label(stage, c) for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    lines += ["| " + " | ".join([_label(stage, r), *(_cell(v) for v in row)]) + " |" for r, row in zip(rows, values)]
    return lines


def _blackbox_markdown(tables: dict[str, dict], surrogate: dict) -> list[str]:
    attacks = surrogate["attacks"]
    lines = ["## Black-box transfer", "",
             f"Accuracy (%) on {surrogate['n_images']} test images under examples crafted at ε={_format_eps(surrogate['eps'])} "
             f"on a surrogate ensemble of {surrogate['size']} independently trained plain classifiers (clean accuracy "
             f"{_cell(surrogate['clean_accuracy'])}%): momentum PGD ({surrogate['restarts']} restarts) and M-DI²-FGSM, "
             f"{surrogate['steps']} steps each; an image counts as correct only if it is under every run, and under "
             "every example of every attack for \"all\". The first row is the surrogate itself (white-box).", "",
             "| Stage | Model | " + " | ".join(attacks) + " |", "|---|---" + "|---:" * len(attacks) + "|",
             "| surrogate | Mixture (white-box) | " + " | ".join(_cell(v) for v in surrogate["accuracy"]) + " |"]
    for stage in _stage_order(tables):
        t = tables[stage]
        lines += [f"| {stage} | {_model_label(stage, m)} | " + " | ".join(_cell(v) for v in row) + " |"
                  for m, row in zip(t["models"], t["accuracy"])]
    return [*lines, ""]


def evaluation_markdown(results: dict) -> str:
    """The sections `full_evaluation` adds to results.md (empty when it has not run); plots are linked
    by their path under the run directory, as results["plots"] records them."""
    if not any(key in results for key in FULL_EVALUATION_KEYS):
        return ""
    plots = results.get("plots", {})
    out = ["## White-box attacks with APGD-CE", "", _whitebox_markdown(results.get("eval", []))]
    for stage in _stage_order(results.get("transfer", {})):
        m = results["transfer"][stage]
        off = mean_off_diagonal(m)
        out += [f"## Transferability: {stage}", "",
                f"PGD-L∞ ε={_format_eps(m['eps'])}, {m['steps']} steps, {m['restarts']} restarts, crafted on the row's "
                f"submodel; success rate (%) on the column's model, over {m['n_images']} test images every submodel "
                f"classifies correctly. Mean off-diagonal success: {_cell(off)}%.", "",
                *_matrix_markdown(stage, m["sources"], m["targets"], m["success"]), ""]
        if "transfer" in plots.get(stage, {}):
            out += [f"![transferability {stage}]({plots[stage]['transfer']})", ""]
    if results.get("blackbox"):
        out += _blackbox_markdown(results["blackbox"], results["blackbox_surrogate"])
    for stage in _stage_order(results.get("eps_sweep", {})):
        s = results["eps_sweep"][stage]
        out += [f"## Accuracy vs ε: {stage}", "",
                f"White-box PGD-L∞, {s['steps']} steps of {s['step_fraction']:g}·ε, {s['restarts']} restarts, "
                f"{s['n_images']} test images.", "",
                *_matrix_markdown(stage, s["models"], [f"ε={_format_eps(e)}" for e in s["eps"]], s["accuracy"]), ""]
        if "eps_sweep" in plots.get(stage, {}):
            out += [f"![accuracy vs ε {stage}]({plots[stage]['eps_sweep']})", ""]
    return "\n".join(out)
