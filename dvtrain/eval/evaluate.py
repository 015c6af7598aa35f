"""`dvtrain eval RUN_DIR`: the whole evaluation of a run's finished stages, in one process.

Per stage: the white-box table (eval.full_attacks: AutoAttack, margin PGD, the adaptive attack, with
the worst case per image and Wilson intervals), the gradient-masking checks, the transferability
matrix, black-box transfer from surrogate ensembles (`dvtrain.eval.blackbox`), and the ε sweep;
written to results.json, results.md, plots/ and (per logging.wandb) a W&B run "<name>-eval". The surrogate ensembles are
trained by a function the caller hands in (`SurrogateTrainer`), so evaluation imports no training code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dvtrain.config import Config, TransferConfig, check_section, to_dict
from dvtrain.data import Dataset, load_dataset
from dvtrain.eval.blackbox import ExampleSet, blackbox_table, prepare_blackbox
from dvtrain.eval.checks import masking_checks, masking_probe
from dvtrain.eval.load import finished_stages, load_stage
from dvtrain.eval.surrogates import SurrogateTrainer
from dvtrain.eval.report import (
    evaluation_markdown, load_results, metric_key, result_metrics, results_markdown, save_results,
)
from dvtrain.eval.transfer import epsilon_sweep, first, shuffled_test_set, transfer_matrix
from dvtrain.eval.whitebox import check_finite, evaluate_stage
from dvtrain.mixture import Mixture


def evaluate_stage_fully(
    stage: str, submodels: list[nn.Module], data: Dataset, cfg: Config, tcfg: TransferConfig,
    blackbox: tuple[list[ExampleSet], Tensor], results: dict,
) -> None:
    """White-box table and checks, transfer matrix, black-box table and ε sweep of one stage, into `results`.

    The white-box table uses the training-time evaluation's images (eval.num_examples); the others
    a seeded random draw of `tcfg.num_images` test images, the same for every stage."""
    x_pool, y_pool = shuffled_test_set(data, cfg.seed)
    x, y = first(x_pool, y_pool, tcfg.num_images)
    print(f"[eval {stage}] white-box table: {', '.join(cfg.eval.full_attacks)}", flush=True)
    rows = evaluate_stage(stage, submodels, data.x_test, data.y_test, cfg.eval, cfg.seed, attacks=cfg.eval.full_attacks)
    results["eval"] = [r for r in results["eval"] if r["stage"] != stage] + rows
    print(f"[eval {stage}] transferability matrix", flush=True)
    results.setdefault("transfer", {})[stage] = transfer_matrix(submodels, x_pool, y_pool, tcfg, cfg.seed)
    print(f"[eval {stage}] black-box transfer", flush=True)
    results.setdefault("blackbox", {})[stage] = blackbox_table(submodels, *blackbox, tcfg.batch_size)
    print(f"[eval {stage}] accuracy vs ε", flush=True)
    results.setdefault("eps_sweep", {})[stage] = epsilon_sweep(submodels, x, y, tcfg, cfg.seed)
    probe = None
    if cfg.eval.checks.enabled:
        print(f"[eval {stage}] gradient-masking checks", flush=True)
        probe = masking_probe(Mixture(submodels), data.x_test, data.y_test, cfg.eval, cfg.seed)
    results.setdefault("checks", {})[stage] = masking_checks(
        stage, rows, probe, results["blackbox"][stage], cfg.eval)


def full_evaluation(run_dir: Path, cfg: Config, stages: list[str] | None, device: torch.device,
                    tcfg: TransferConfig, train_surrogates: SurrogateTrainer) -> dict:
    """The whole evaluation of a run's finished stages (all of them when `stages` is None).
    Single process: every submodel is loaded here, whatever world size trained them."""
    from dvtrain.eval.blackbox_plot import add_blackbox_plot
    from dvtrain.eval.plots import evaluation_plots

    run_dir = Path(run_dir)
    check_section(tcfg, "eval.transfer.")
    stages = finished_stages(run_dir, cfg, stages)
    data = load_dataset(cfg.data).to(device)
    results = load_results(run_dir)
    loaded = {stage: load_stage(run_dir, cfg, data, stage, device) for stage in stages}
    for stage, submodels in loaded.items():  # refuse a broken checkpoint before any long computation
        for i, model in enumerate(submodels):
            check_finite(model, data.x_test[: cfg.eval.batch_size], f"submodel {i + 1} of stage {stage}")
    sets, y_blackbox, results["blackbox_surrogate"] = prepare_blackbox(run_dir, cfg, tcfg, data, device, train_surrogates)
    for stage, submodels in loaded.items():
        evaluate_stage_fully(stage, submodels, data, cfg, tcfg, (sets, y_blackbox), results)
    results["plots"] = evaluation_plots(run_dir, results)
    add_blackbox_plot(run_dir, results)
    save_results(run_dir, cfg, results)
    log_evaluation(cfg, run_dir, results)
    evaluated = [r for r in results["eval"] if r["stage"] in stages]
    print(results_markdown(evaluated, results.get("checks", {})) + "\n" + evaluation_markdown(results), flush=True)
    return results


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
