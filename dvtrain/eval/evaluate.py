"""`dvtrain eval RUN_DIR`: the whole evaluation of a run's finished stages, in one process or several.

Per stage: the white-box table (eval.full_attacks: AutoAttack, margin PGD, the adaptive attack, with
the worst case per image and Wilson intervals), the gradient-masking checks, the transferability
matrix, black-box transfer from surrogate ensembles (`dvtrain.eval.blackbox`), the ε sweep and the
vulnerability-diversity matrix; written to results.json, results.md, plots/ and (per logging.wandb) a
W&B run "<name>-eval". The surrogate ensembles are
trained by a function the caller hands in (`SurrogateTrainer`), so evaluation imports no training code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from dvtrain.config import Config, TransferConfig, check_section, to_dict
from dvtrain.data import Dataset, load_dataset
from dvtrain.eval.budget import reduced_budget_note
from dvtrain.eval.blackbox import ExampleSet, blackbox_images, blackbox_table, image_digest, prepare_blackbox
from dvtrain.eval.checks import masking_checks, masking_probe
from dvtrain.eval.diversity import diversity_evaluation
from dvtrain.eval.progress import Phases
from dvtrain.eval.load import finished_stages, load_stage
from dvtrain.eval.surrogates import SurrogateTrainer
from dvtrain.eval.report import (
    EVAL_TABLE, FULL_EVALUATION_KEYS, evaluation_markdown, merge_rows, metric_key, result_metrics, results_markdown, update_results,
)
from dvtrain.eval.sweep import epsilon_sweep
from dvtrain.eval.transfer import first, shuffled_test_set, transfer_matrix
from dvtrain.errors import DvtrainError
from dvtrain.eval.whitebox import ChunkShare, check_finite, chunk_count, evaluate_stage, too_many_processes
from dvtrain.mixture import Mixture
from dvtrain.rundir import RunDir

SURROGATE_LOCK = ".surrogates.lock"  # the surrogate cache's own lock: its training may take an hour


def evaluate_stage_fully(
    stage: str, submodels: list[nn.Module], rows: list[dict], data: Dataset, cfg: Config, tcfg: TransferConfig,
    blackbox: tuple[list[ExampleSet], Tensor, str], results: dict, phases: Phases | None = None,
) -> None:
    """Given the stage's white-box `rows`: its checks, transfer matrix, black-box table and ε sweep, into
    `results` (this evaluation's own, merged into results.json later). These use a seeded random draw
    of `tcfg.num_images` test images, the same for every stage; the ε sweep and the black-box table the
    same ones (`blackbox_images`; `blackbox` is (example sets, their labels, their images' digest)).
    `phases` times each part with a bar."""
    phases = phases if phases is not None else Phases(False)
    x_pool, y_pool = shuffled_test_set(data, cfg.seed)
    n_transfer = len(first(x_pool, y_pool, tcfg.num_images)[1]) * len(submodels)
    with phases.phase(f"{stage} transferability matrix", n_transfer) as bar:
        results.setdefault("transfer", {})[stage] = transfer_matrix(submodels, x_pool, y_pool, tcfg, cfg.seed)
        bar.update(n_transfer)
    sets, y_blackbox, images = blackbox
    with phases.phase(f"{stage} black-box transfer", len(y_blackbox) * len(sets)) as bar:
        results.setdefault("blackbox", {})[stage] = blackbox_table(submodels, sets, y_blackbox, tcfg.batch_size,
                                                                   images)
        bar.update(len(y_blackbox) * len(sets))
    x, y, index = blackbox_images(data, tcfg)
    sweep_cfg = dataclasses.replace(cfg.eval, transfer=tcfg)
    n_sweep = len(y) * (len(submodels) + 1) * len(tcfg.sweep_eps)
    with phases.phase(f"{stage} accuracy vs ε", n_sweep) as bar:  # tcfg.sweep_attacks and their worst case
        results.setdefault("eps_sweep", {})[stage] = epsilon_sweep(submodels, x, y, sweep_cfg, cfg.seed) | {
            "images": image_digest(index)}
        bar.update(n_sweep)
    probe = None
    if cfg.eval.checks.enabled:
        with phases.phase(f"{stage} gradient-masking checks"):
            probe = masking_probe(Mixture(submodels), data.x_test, data.y_test, cfg.eval, cfg.seed)
    results.setdefault("checks", {})[stage] = masking_checks(
        stage, rows, probe, results["blackbox"][stage], cfg.eval, results["eps_sweep"][stage])


def full_evaluation(run_dir: Path, cfg: Config, stages: list[str] | None, device: torch.device,
                    tcfg: TransferConfig, train_surrogates: SurrogateTrainer, command: str = "dvtrain eval",
                    share: ChunkShare | None = None) -> dict | None:
    """The whole evaluation of a run's finished stages (all of them when `stages` is None).

    Every process loads every submodel. The white-box tables (eval.full_attacks, on the training-time
    table's images, eval.num_examples) are shared out by `share` (chunks of eval.chunk_size test images,
    chunk c on rank c % world; None: one process), with the same rows for any number of processes. The
    rest (surrogate ensembles in the shared transfer cache, transfer matrix, black-box table, ε sweep,
    checks, diversity, plots) is computed by rank 0 alone; the other ranks return None once the
    white-box tables are gathered.

    The new figures are merged into results.json under the run directory's lock at the end (rows by
    `report.ROW_KEY`, the per-stage sections by stage), so rows of other stages, ε and budgets that
    results.json holds, also those a concurrent `dvtrain eval` wrote meanwhile, are kept. The
    surrogate cache is loaded or trained under its own lock. Returns results.json as written (rank 0).
    Raises DvtrainError for more processes than chunks, before any attack."""
    from dvtrain.eval.blackbox_plot import add_blackbox_plot
    from dvtrain.eval.plots import evaluation_plots

    run = RunDir(run_dir)
    check_section(tcfg, "eval.transfer.")
    stages = finished_stages(run.path, cfg, stages)
    data = load_dataset(cfg.data).to(device)
    n_table = len(data.y_test) if cfg.eval.num_examples == 0 else min(len(data.y_test), cfg.eval.num_examples)
    if share is not None and share.world > chunk_count(n_table, cfg.eval):
        raise DvtrainError(too_many_processes(share.world, n_table, cfg.eval))
    loaded = {stage: load_stage(run.path, cfg, data, stage, device) for stage in stages}
    for stage, submodels in loaded.items():  # refuse a broken checkpoint before any long computation
        for i, model in enumerate(submodels):
            check_finite(model, data.x_test[: cfg.eval.batch_size], f"submodel {i + 1} of stage {stage}")
    main = share is None or share.rank == 0
    note = reduced_budget_note(cfg.eval)
    if main and note:
        print(note, flush=True)
    phases = Phases(cfg.logging.progress and main)
    rows = {}
    for stage, submodels in loaded.items():
        if main:
            print(f"[eval {stage}] white-box table: {', '.join(cfg.eval.full_attacks)}", flush=True)
        rows[stage] = evaluate_stage(stage, submodels, data.x_test, data.y_test, cfg.eval, cfg.seed,
                                     attacks=cfg.eval.full_attacks, share=share, phases=phases)
    if not main:
        return None
    new: dict = {"eval": [r | {"table": EVAL_TABLE, "command": command} for stage in rows for r in rows[stage]]}
    with run.lock(SURROGATE_LOCK):  # one writer of the cache
        sets, y_blackbox, new["blackbox_surrogate"] = prepare_blackbox(run.path, cfg, tcfg, data, device,
                                                                       train_surrogates, phases)
    for stage, submodels in loaded.items():
        evaluate_stage_fully(stage, submodels, rows[stage], data, cfg, tcfg,
                             (sets, y_blackbox, new["blackbox_surrogate"]["images"]), new, phases)
    n_pairs = min(cfg.eval.diversity.num_images, len(data.y_test)) * len(loaded) if cfg.eval.diversity.enabled else 0
    with phases.phase("vulnerability-diversity matrices", n_pairs) as bar:
        diversity_evaluation(run.path, loaded, data, cfg, new)
        bar.update(n_pairs)
    new["plots"] = evaluation_plots(run.path, new)
    add_blackbox_plot(run.path, new)
    new["eval_provenance"] = {"command": command, "world_size": 1 if share is None else share.world,
                              "threads_per_process": torch.get_num_threads(), "phase_s": dict(phases.seconds)}

    def change(stored: dict) -> None:
        stored["eval"] = merge_rows(stored["eval"], new["eval"])
        for key in (*FULL_EVALUATION_KEYS, "plots"):
            stored.setdefault(key, {}).update(new.get(key, {}))
        stored["blackbox_surrogate"] = new["blackbox_surrogate"]
        stored["eval_provenance"] = new["eval_provenance"]

    results = update_results(run.path, cfg, change)
    log_evaluation(cfg, run.path, results)
    print(results_markdown(new["eval"], new.get("checks", {}), cfg.stages) + "\n" + evaluation_markdown(results),
          flush=True)
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
        tracker.summary({metric_key(*key): value for key, value in metrics.items()}
                        | {f"eval/time/{phase}_s": s for phase, s in results.get("eval_provenance", {}).get("phase_s", {}).items()})
        exit_code = 0
    finally:
        tracker.finish(exit_code)
