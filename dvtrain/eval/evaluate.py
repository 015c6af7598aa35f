"""`dvtrain eval RUN_DIR`: the whole evaluation of a run's finished stages, in one process or several.

Per stage, every registered table (`dvtrain.eval.tables`): the white-box table (eval.full_attacks:
AutoAttack, margin PGD, the adaptive attack, with the worst case per image and Wilson intervals), the
transferability matrix, black-box transfer from surrogate ensembles (`dvtrain.eval.blackbox`), the ε
sweep, the vulnerability-diversity matrix, the gradient-masking checks, and any plug-in table; written to
results.json, results.md, plots/ and (per logging.wandb) a W&B run "<name>-eval". The surrogate ensembles are
trained by a function the caller hands in (`SurrogateTrainer`), so evaluation imports no training code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dvtrain.config import Config, TransferConfig, check_section, to_dict
from dvtrain.data import Dataset, load_dataset
from dvtrain.eval.attacks.registry import check_names
from dvtrain.eval.budget import reduced_budget_note
from dvtrain.eval.attacks.transfer import TRANSFER_ATTACKS, transfer_attack
from dvtrain.eval.blackbox import applicable_attacks, check_attacks
from dvtrain.eval.headline import Headline, headline_lines
from dvtrain.eval.progress import Phases
from dvtrain.eval.load import finished_stages, load_stage
from dvtrain.eval.surrogates import SurrogateTrainer
from dvtrain.digest import images_digest, split_digest
from dvtrain.eval.report import (
    TRAIN_TABLE, eval_summary, load_results, result_metrics, update_results,
)
from dvtrain.eval.share import Share, is_main, run_work
from dvtrain.eval.tables import registry
from dvtrain.eval.tables.contract import Suite
from dvtrain.errors import DvtrainError
from dvtrain.eval.whitebox import check_finite, chunk_count, too_many_processes
from dvtrain.results import ROWS, add_stage_section
from dvtrain.rundir import RunDir
from dvtrain.splits import check_evaluation


def full_evaluation(run_dir: Path, cfg: Config, stages: list[str] | None, device: torch.device,
                    tcfg: TransferConfig, train_surrogates: SurrogateTrainer, command: str = "dvtrain eval",
                    share: Share | None = None) -> dict | None:
    """The whole evaluation of a run's finished stages (all of them when `stages` is None): every registered
    table (`dvtrain.eval.tables.registry`) in turn, plan → share → assemble → store.

    The pre-checks run once, before any work (every rank alike): the config sections, the attack names
    against their registries, the run's data against what training recorded, every checkpoint's outputs,
    the model-dependent settings, more processes than the white-box table has chunks. Every process loads
    every submodel; each table's work is shared out by `share` (None: one process) as cost-balanced tasks
    with the same numbers for any number of processes (`dvtrain.eval.share`). Rank 0 alone assembles each
    table's entries (e.g. scores the black-box tables, runs the gradient-masking checks) and writes; the
    other ranks return None.

    The new entries are merged into results.json under the run directory's lock at the end (each table's
    `store`: rows by `report.ROW_KEY`, the per-stage sections by stage), so entries of other stages, ε and
    budgets that results.json holds, also those a concurrent `dvtrain eval` wrote meanwhile, are kept; then
    each table draws its figures from the merged results. Each surrogate ensemble and example set is
    trained or crafted under its own lock in the cache. Returns results.json as written (rank 0).
    Raises DvtrainError for more processes than chunks, before any attack."""
    run = RunDir(run_dir)
    check_section(tcfg, "eval.transfer.")
    check_attacks(tcfg)  # against the transfer-attack registry, with the closest name for a typo
    check_names(dataclasses.replace(cfg.eval, transfer=tcfg))  # the white-box attack lists, against theirs
    stages = finished_stages(run.path, cfg, stages)
    data = load_dataset(cfg.data).to(device)
    main = is_main(share)
    for note in check_evaluation(cfg, tcfg, len(data.y_train), len(data.y_test)) if main else []:
        print(note, flush=True)
    n_table = len(data.y_test) if cfg.eval.num_examples == 0 else min(len(data.y_test), cfg.eval.num_examples)
    if share is not None and share.world > chunk_count(n_table, cfg.eval):
        raise DvtrainError(too_many_processes(share.world, n_table, cfg.eval))
    split = verify_run_data(run.path, data, main)
    loaded = {stage: load_stage(run.path, cfg, data, stage, device) for stage in stages}
    for stage, submodels in loaded.items():  # refuse a broken checkpoint before any long computation
        for i, model in enumerate(submodels):
            check_finite(model, data.x_test[: cfg.eval.batch_size], f"submodel {i + 1} of stage {stage}")
    check_model_settings(cfg, tcfg, next(iter(loaded.values())))
    note = reduced_budget_note(cfg.eval)
    if main and note:
        print(note, flush=True)
    suite = Suite(run.path, cfg, tcfg, data, device, loaded, share, Phases(cfg.logging.progress and main), command,
                  train_surrogates)
    evaluated = [table for table in registry.tables() if table.enabled(suite)]
    new: dict = {}
    for table in evaluated:
        with suite.phases.phase(f"{table.name} table"):  # one line per table; the bars of its tasks collapse
            done = run_work(table.work(suite), share, suite.phases)
        if main:
            new[table.name] = table.assemble(suite, done, new)
    if not main:
        return None
    provenance = {"command": command, "world_size": 1 if share is None else share.world,
                  "threads_per_process": torch.get_num_threads(), "phase_s": dict(suite.phases.seconds)}

    def change(stored: dict) -> None:
        stored[DATA_KEY] = split
        for table in evaluated:
            if table.name != ROWS:  # every other table's section maps stage → entry (the contract)
                add_stage_section(stored, table.name)
            table.store(stored, new[table.name])
        plots = stored.setdefault("plots", {})
        for table in evaluated:  # from the merged results: a figure may show stages evaluated earlier too
            for stage, files in table.figures(suite, stored).items():
                plots.setdefault(stage, {}).update(files)
        stored["eval_provenance"] = provenance

    results = update_results(run.path, cfg, change)
    # Results are written: what follows only reports them.
    synced = log_evaluation(cfg, run.path, results)
    print("\n".join(closing_block(run, results, list(loaded), cfg, synced)), flush=True)
    return results


def closing_block(run: RunDir, results: dict, stages: list[str], cfg: Config, sync: str | None) -> list[str]:
    """The lines `dvtrain eval` ends with: the headline figures of the stages it evaluated
    (`dvtrain.eval.headline`), where the tables and figures are, and how to upload an offline W&B run
    (`sync`: `Tracker.sync_hint`, None when there is nothing to upload)."""
    lines = ["", f"[eval] done: {', '.join(stages)}", *headline_lines(results, stages, Headline(cfg.eval.eps, cfg.eval.l2_eps)),
             f"  every table, its budgets and checks: {run.results_md}",
             f"  numbers with their basis: {run.results_json}", f"  figures: {run.plots}/"]
    if sync is not None:
        lines.append(f"  {sync}")
    return lines


def check_model_settings(cfg: Config, tcfg: TransferConfig, submodels: list[nn.Module]) -> None:
    """Settings whose valid range depends on the model, checked before any work (every rank alike):
    eval.diversity.layer must be one of the architecture's layers, and at least one of
    eval.transfer.blackbox_attacks must apply to it (the surrogates share its architecture; SGM needs skip
    connections), so no surrogate ensemble is trained for an empty table. Raises DvtrainError."""
    div = cfg.eval.diversity
    layers = submodels[0].num_layers
    if div.enabled and div.layer is not None and not 1 <= div.layer <= layers:
        raise DvtrainError(f"eval.diversity.layer={div.layer} is out of range: {cfg.model.arch} has layers 1..{layers}; "
                           f"pass one of them, or null for a random layer per batch")
    usable, notes = applicable_attacks(tcfg, submodels, cfg.model.arch)
    if not usable:
        runnable = [name for name in TRANSFER_ATTACKS if transfer_attack(name).applies(submodels)]
        raise DvtrainError(f"eval.transfer.blackbox_attacks={list(tcfg.blackbox_attacks)}: none applies to "
                           f"{cfg.model.arch} ({'; '.join(notes)}); list one of {runnable}")


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


def log_evaluation(cfg: Config, run_dir: Path, results: dict) -> str | None:
    """A W&B run "<name>-eval" (job type eval): tables, plots as images, every number in the summary.
    Returns how to upload it when it is offline (`Tracker.sync_hint`), else None."""
    from dvtrain.tracking import Tracker

    tracker = Tracker(cfg.logging, run_dir, cfg.name, "eval", to_dict(cfg), active=True)
    if tracker.run is None:
        return None
    hint = tracker.sync_hint()
    import wandb

    exit_code = 1
    try:
        metrics = result_metrics(results)
        table = wandb.Table(columns=["stage", "model", "metric", "value"],
                            data=[[*key, value] for key, value in metrics.items()])
        logged: dict = {"eval/table": table}
        for evaluation_table in registry.tables():
            for key, (columns, rows) in evaluation_table.wandb_tables(results).items():
                logged[key] = wandb.Table(columns=columns, data=rows)
        for stage, files in results.get("plots", {}).items():
            logged.update({f"eval/{stage}/{kind}": wandb.Image(str(run_dir / rel)) for kind, rel in files.items()})
        tracker.run.log(logged)
        tracker.summary(eval_summary(results)
                        | {f"eval/time/{phase}_s": s for phase, s in results.get("eval_provenance", {}).get("phase_s", {}).items()})
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    return hint
