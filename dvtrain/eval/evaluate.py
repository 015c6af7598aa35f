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
from dvtrain.eval.blackbox import ExampleSet, blackbox_images, blackbox_table, check_attacks, prepare_blackbox
from dvtrain.eval.checks import masking_checks, masking_probe
from dvtrain.eval.diversity import diversity_evaluation, diversity_plots
from dvtrain.eval.progress import Phases
from dvtrain.eval.load import finished_stages, load_stage
from dvtrain.eval.surrogates import SurrogateTrainer
from dvtrain.digest import images_digest, split_digest
from dvtrain.eval.report import (
    EVAL_TABLE, FULL_EVALUATION_KEYS, TRAIN_TABLE, eval_summary, evaluation_markdown, load_results, merge_rows,
    result_metrics, results_markdown, update_results,
)
from dvtrain.eval.share import Share, is_main
from dvtrain.eval.sweep import epsilon_sweeps
from dvtrain.eval.transfer import shuffled_test_set, transfer_matrices
from dvtrain.errors import DvtrainError
from dvtrain.eval.whitebox import check_finite, chunk_count, evaluate_stage, too_many_processes
from dvtrain.mixture import Mixture
from dvtrain.rundir import RunDir
from dvtrain.splits import check_evaluation


def shared_evaluation(loaded: dict[str, list[nn.Module]], data: Dataset, cfg: Config, tcfg: TransferConfig,
                      phases: Phases, share: Share | None) -> dict:
    """Every stage's transferability matrix and ε sweep, their runs shared out by `share` (None: all here):
    {"transfer": {stage: matrix}, "eps_sweep": {stage: sweep}} on every rank. The matrices use a seeded
    random draw of the test images (`shuffled_test_set`), the same for every stage; the sweep the
    black-box protocol's images (`blackbox_images`), so its worst case and the black-box "all" column at
    one ε count the same images."""
    x_pool, y_pool = shuffled_test_set(data, cfg.seed)
    with phases.phase("transferability matrices") as bar:
        transfer = transfer_matrices(loaded, x_pool, y_pool, tcfg, cfg.seed, share, bar)
    x, y, _ = blackbox_images(data, tcfg)
    sweep_cfg = dataclasses.replace(cfg.eval, transfer=tcfg)
    with phases.phase("accuracy vs ε") as bar:  # tcfg.sweep_attacks and their worst case
        sweeps = epsilon_sweeps(loaded, x, y, sweep_cfg, cfg.seed, share, bar)
    return {"transfer": transfer, "eps_sweep": {stage: sweep | {"images": images_digest(x, y)} for stage, sweep in sweeps.items()}}


def stage_checks(stage: str, submodels: list[nn.Module], rows: list[dict], data: Dataset, cfg: Config, tcfg: TransferConfig,
                 blackbox: tuple[list[ExampleSet], Tensor, str], results: dict, phases: Phases) -> None:
    """Rank 0, given the stage's white-box `rows` and its ε sweep in `results`: its black-box table
    (`blackbox` is (example sets, their labels, the protocol's description), stored with the table) and
    gradient-masking checks."""
    sets, y_blackbox, protocol = blackbox
    with phases.phase(f"{stage} black-box transfer", len(y_blackbox) * len(sets)) as bar:
        # The protocol goes with the stage's table: stages evaluated apart may use other surrogates or budgets.
        results.setdefault("blackbox", {})[stage] = blackbox_table(submodels, sets, y_blackbox, tcfg.batch_size,
                                                                   protocol["images"]) | {"protocol": protocol}
        bar.update(len(y_blackbox) * len(sets))
    probe = None
    if cfg.eval.checks.enabled:
        with phases.phase(f"{stage} gradient-masking checks"):
            probe = masking_probe(Mixture(submodels), data.x_test, data.y_test, cfg.eval, cfg.seed)
    results.setdefault("checks", {})[stage] = masking_checks(
        stage, rows, probe, results["blackbox"][stage], cfg.eval, results["eps_sweep"][stage])


def full_evaluation(run_dir: Path, cfg: Config, stages: list[str] | None, device: torch.device,
                    tcfg: TransferConfig, train_surrogates: SurrogateTrainer, command: str = "dvtrain eval",
                    share: Share | None = None) -> dict | None:
    """The whole evaluation of a run's finished stages (all of them when `stages` is None).

    Every process loads every submodel, and the work is shared out by `share` (None: one process) with
    the same numbers for any number of processes (`dvtrain.eval.share`): the white-box tables
    (eval.full_attacks, on the training-time table's images, eval.num_examples) in chunks of
    eval.chunk_size test images; the surrogate ensembles and example sets (into the shared transfer
    cache), the transferability runs, the ε sweep's cells and the diversity matrices' rows as tasks.
    Rank 0 alone scores the black-box tables (forward passes), runs the gradient-masking checks, draws
    the plots and writes; the other ranks return None.

    The new figures are merged into results.json under the run directory's lock at the end (rows by
    `report.ROW_KEY`, the per-stage sections by stage), so rows of other stages, ε and budgets that
    results.json holds, also those a concurrent `dvtrain eval` wrote meanwhile, are kept. Each surrogate
    ensemble and example set is trained or crafted under its own lock in the cache. Returns
    results.json as written (rank 0).
    Raises DvtrainError for more processes than chunks, before any attack."""
    from dvtrain.eval.blackbox_plot import add_blackbox_plot
    from dvtrain.eval.plots import evaluation_plots

    run = RunDir(run_dir)
    check_section(tcfg, "eval.transfer.")
    check_attacks(tcfg)  # against the transfer-attack registry, with the closest name for a typo
    stages = finished_stages(run.path, cfg, stages)
    data = load_dataset(cfg.data).to(device)
    for note in check_evaluation(cfg, tcfg, len(data.y_train), len(data.y_test)) if is_main(share) else []:
        print(note, flush=True)
    n_table = len(data.y_test) if cfg.eval.num_examples == 0 else min(len(data.y_test), cfg.eval.num_examples)
    if share is not None and share.world > chunk_count(n_table, cfg.eval):
        raise DvtrainError(too_many_processes(share.world, n_table, cfg.eval))
    split = verify_run_data(run.path, data, is_main(share))
    loaded = {stage: load_stage(run.path, cfg, data, stage, device) for stage in stages}
    for stage, submodels in loaded.items():  # refuse a broken checkpoint before any long computation
        for i, model in enumerate(submodels):
            check_finite(model, data.x_test[: cfg.eval.batch_size], f"submodel {i + 1} of stage {stage}")
    check_model_settings(cfg, next(iter(loaded.values())))
    main = is_main(share)
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
    new: dict = {"eval": [r | {"table": EVAL_TABLE, "command": command} for stage in rows for r in rows[stage]]}
    blackbox = prepare_blackbox(run.path, cfg, tcfg, data, device, train_surrogates, phases, share)
    new |= shared_evaluation(loaded, data, cfg, tcfg, phases, share)
    with phases.phase("vulnerability-diversity matrices") as bar:
        diversity_evaluation(loaded, data, cfg, new, share, bar)
    if not main:
        return None
    for stage, submodels in loaded.items():
        stage_checks(stage, submodels, rows[stage], data, cfg, tcfg, blackbox, new, phases)
    new["plots"] = evaluation_plots(run.path, new)
    new["eval_provenance"] = {"command": command, "world_size": 1 if share is None else share.world,
                              "threads_per_process": torch.get_num_threads(), "phase_s": dict(phases.seconds)}

    def change(stored: dict) -> None:
        stored[DATA_KEY] = split
        stored["eval"] = merge_rows(stored["eval"], new["eval"])
        for key in (*FULL_EVALUATION_KEYS, "plots"):
            stored.setdefault(key, {}).update(new.get(key, {}))
        stored["eval_provenance"] = new["eval_provenance"]
        add_blackbox_plot(run.path, stored, cfg.stages)  # every evaluated stage's curves, this run's and earlier ones
        diversity_plots(run.path, stored)  # every evaluated stage's heat map, on one colour scale

    results = update_results(run.path, cfg, change)
    log_evaluation(cfg, run.path, results)
    print(results_markdown(new["eval"], new.get("checks", {}), cfg.stages) + "\n" + evaluation_markdown(results),
          flush=True)
    return results


def check_model_settings(cfg: Config, submodels: list[nn.Module]) -> None:
    """Settings whose valid range depends on the model, checked before any work (every rank alike):
    eval.diversity.layer must be one of the architecture's layers. Raises DvtrainError."""
    div = cfg.eval.diversity
    layers = submodels[0].num_layers
    if div.enabled and div.layer is not None and not 1 <= div.layer <= layers:
        raise DvtrainError(f"eval.diversity.layer={div.layer} is out of range: {cfg.model.arch} has layers 1..{layers}; "
                           f"pass one of them, or null for a random layer per batch")


DATA_KEY = "data"  # results.json: {"train": digest, "test": digest} of the split the run is evaluated on


def verify_run_data(run_dir: Path, data: Dataset, main: bool = True) -> dict[str, str]:
    """The split digest of `data` ({"train", "test"}: `dvtrain.digest.split_digest`), after checking it
    against what the run recorded: results.json "data" (written by every `dvtrain eval` since issue 26),
    and the test split of every row its training wrote (each row's "test_split" and "images", the digest
    of the whole test set and of its first n images). Raises DvtrainError naming the split that differs (e.g. a hand-edited data.test_fraction
    or another data.root: the models would be scored on other images, perhaps ones they trained on).
    A run that recorded neither (trained by an earlier dvtrain) is said once (on the main process) and
    evaluated."""
    split = split_digest(data.x_train, data.y_train, data.x_test, data.y_test)
    results = load_results(run_dir)
    fix = ("restore the data section of its config.yaml (data.name, data.test_fraction, data.root, ...) to what "
           "the run was trained with")
    recorded = results.get(DATA_KEY)
    if isinstance(recorded, dict):
        for part in ("train", "test"):
            if recorded.get(part) not in (None, split[part]):
                raise DvtrainError(f"{run_dir}: the {part} images differ from those the run recorded (digest "
                                   f"{recorded[part]}, now {split[part]}); {fix}")
    checked = isinstance(recorded, dict)
    by_n: dict[int, str] = {}
    trained_on = set()
    for row in results.get("eval", []):
        if row.get("table") == TRAIN_TABLE and isinstance(row.get("images"), str) and isinstance(row.get("n"), int):
            by_n.setdefault(row["n"], row["images"])
            trained_on.add(row.get("test_split"))
    for digest in trained_on - {None}:
        if digest != split["test"]:
            raise DvtrainError(f"{run_dir}: the test images differ from those its training evaluated on (test split "
                               f"digest {digest}, now {split['test']}); {fix}")
    for n, digest in sorted(by_n.items()):
        now = images_digest(data.x_test[:n], data.y_test[:n]) if n <= len(data.y_test) else None
        if now != digest:
            raise DvtrainError(f"{run_dir}: the test images differ from those its training evaluated (digest {digest} "
                               f"of the first {n}, now {now or f'only {len(data.y_test)} test images'}); {fix}")
        checked = True
    if not checked and main:
        print(f"[eval] {run_dir} records no digest of its data (trained by an earlier dvtrain): the data cannot be "
              "verified against training; evaluating as configured", flush=True)
    return split


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
        tracker.summary(eval_summary(results)
                        | {f"eval/time/{phase}_s": s for phase, s in results.get("eval_provenance", {}).get("phase_s", {}).items()})
        exit_code = 0
    finally:
        tracker.finish(exit_code)
