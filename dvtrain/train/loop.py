"""The stage loop: composes data, submodels, the stages, checkpoints, tracking and evaluation.

For each configured stage (`dvtrain.train.registry`): restore its checkpoint or start it from the
weights of the stage it builds on (or from fresh weights), train the remaining epochs (checkpointing at
epoch ends and every `checkpoint.every_steps` steps; Ctrl-C checkpoints where it stops), then evaluate
the submodels and their mixture and record the table in `results.json`/`results.md`. The loop knows no
stage by name: a stage is its class in the registry.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dvtrain import checkpoint, provenance
from dvtrain.compute import autocast
from dvtrain.config import Config, to_dict
from dvtrain.data import Dataset, num_batches
from dvtrain.distributed.placement import LocalPlacement, Placement
from dvtrain.distributed.runtime import launched_world_size
from dvtrain.errors import DvtrainError
from dvtrain.eval.report import (
    FULL_EVALUATION_KEYS, TRAIN_TABLE, load_results, metric_name, results_markdown, update_results,
)
from dvtrain.eval.whitebox import evaluate_stage
from dvtrain.mixture import mixture_log_probs
from dvtrain.models import training_mode
from dvtrain.rng import stream
from dvtrain.rundir import RunDir
from dvtrain.signals import SignalGuard, StopRequested
from dvtrain.submodels import Owned
from dvtrain.timing import PhaseTimer
from dvtrain.tracking import Progress, StepHistory, Tracker, new_run_id, resolve_mode, sync_command
from dvtrain.train.curves import training_curves
from dvtrain.train.optim import build_owned, set_epoch_lr
from dvtrain.train.registry import REGISTRY
from dvtrain.train.stage import StageRun, StepFigures

# W&B key prefix of the step figures (`train/<metric>/sub<i>`, `train/<metric>/mixture`).
TRAIN = "train"


class NonFiniteLoss(DvtrainError):
    pass


@dataclasses.dataclass
class Context:
    cfg: Config
    run_dir: Path
    data: Dataset
    placement: Placement
    device: torch.device


@torch.no_grad()
def test_metrics(owned: Owned, placement: Placement, data: Dataset, batch_size: int) -> dict[str, float]:
    """Clean test accuracy of every submodel and of the mixture, and the mixture's test loss."""
    logits = []
    for i in owned.ids:
        with training_mode(owned.models[i], False):
            x = data.x_test
            logits.append(torch.cat([owned.models[i](x[s : s + batch_size]) for s in range(0, len(x), batch_size)]))
    every = placement.all_gather(torch.stack(logits))  # [size, N, K]
    y = data.y_test
    out = {f"test/acc/sub{i}": float((every[i].argmax(1) == y).float().mean() * 100) for i in range(placement.size)}
    log_probs = mixture_log_probs(every)
    out["test/acc/mixture"] = float((log_probs.argmax(1) == y).float().mean() * 100)
    out["test/loss/mixture"] = float(F.nll_loss(log_probs, y))
    return out


class StepLog:
    """Step figures kept on the device and reduced every `logging.every_steps` steps (and before a
    checkpoint), so a step never waits for the device; the non-finite check rides on the reduction.

    One reduction: the owned submodels' figures are summed over data-parallel replicas (weighted by
    their share of the rows) and gathered from every process; the mixture's loss and accuracy on each
    step's clean batch come from the gathered clean logits.
    """

    def __init__(self, placement: Placement, stage: str, epoch: int) -> None:
        self.placement, self.stage, self.epoch = placement, stage, epoch
        self.pending: list[tuple[int, StepFigures, float]] = []

    def add(self, step: int, figures: StepFigures) -> None:
        self.pending.append((step, figures, self.placement.replicas.share))

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """(step, {key: value}) of every pending step: `train/NAME/sub<i>` per submodel, `train/NAME/mixture`
        for the mixture on the step's clean batch, `train/NAME` for ensemble terms.

        Raises:
            NonFiniteLoss: a figure is NaN or infinite (the checkpoint before it is kept).
        """
        if not self.pending:
            return []
        placement, replicas = self.placement, self.placement.replicas
        steps = [step for step, _, _ in self.pending]
        figures = [f for _, f, _ in self.pending]
        shares = torch.tensor([share for _, _, share in self.pending])
        names = list(figures[0].per_submodel)
        # [n_own, S, names] → full-batch values → [N, S, names]
        owned = torch.stack([torch.stack([f.per_submodel[n] for n in names], dim=-1) for f in figures], dim=1)
        every = placement.all_gather(replicas.sum(owned, shares.to(owned.device)[None, :, None]))
        ensemble_names = list(figures[0].ensemble)
        columns = {f"{TRAIN}/{name}/sub{i}": every[i, :, k] for k, name in enumerate(names) for i in range(placement.size)}
        scalars = [torch.stack([f.ensemble[n] for n in ensemble_names]) for f in figures] if ensemble_names else []
        if figures[0].clean_logits is not None:
            # The mixture on each step's clean batch: one gather of every step's logits at once.
            logits = placement.all_gather(torch.cat([f.clean_logits for f in figures], dim=1))  # [N, ΣB, K]
            y = torch.cat([f.y for f in figures])
            log_probs = mixture_log_probs(logits)
            per_image = torch.stack([F.nll_loss(log_probs, y, reduction="none"),
                                     (log_probs.argmax(dim=1) == y).float() * 100], dim=1)
            mixture = torch.stack([part.mean(dim=0) for part in per_image.split([len(f.y) for f in figures])])
            scalars = [torch.cat([s, m]) for s, m in zip(scalars, mixture)] if scalars else list(mixture)
            ensemble_names = ensemble_names + ["loss/mixture", "acc/mixture"]
        if ensemble_names:
            table = replicas.sum(torch.stack(scalars), shares.to(owned.device)[:, None])
            columns.update({f"{TRAIN}/{name}": table[:, k] for k, name in enumerate(ensemble_names)})
        keys = list(columns)
        values = torch.stack([columns[k] for k in keys], dim=1).tolist()  # the one wait for the device
        self.pending = []
        rows = [(step, dict(zip(keys, row))) for step, row in zip(steps, values)]
        for step, row in rows:
            bad = [k for k, v in row.items() if not math.isfinite(v)]
            if bad:
                name, _, index = bad[0].removeprefix(TRAIN + "/").rpartition("/sub")
                where = f"{name} of submodel {index}" if name and index.isdigit() else f"{bad[0]} of the ensemble"
                raise NonFiniteLoss(
                    f"{where} is not finite at {self.stage} epoch {self.epoch + 1} step {step}; "
                    f"the last good checkpoint is kept; lower {self.stage}.optim.lr "
                    "and start again (or resume a copy of the run with the config edited)"
                )
        return rows


def _start_state(ctx: Context, stage: str, owned: Owned) -> dict:
    """Restore the stage's own checkpoint, or start it from the weights of the stage it builds on."""
    cfg = ctx.cfg
    path = checkpoint.latest(RunDir(ctx.run_dir).checkpoints(stage))
    if path is not None:
        state = checkpoint.read_state(path)
        expected = {"arch": cfg.model.arch, "ensemble_size": cfg.ensemble.size}
        found = {k: state.get(k) for k in expected}
        if found != expected:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} holds {found}, but the config asks for {expected}; use another run directory"
            )
        checkpoint.load_weights(path, owned)
        checkpoint.load_resume_state(path, owned)
        return state
    source = getattr(cfg, stage).init_from
    if source is not None:  # None: the fresh initialisation build_owned made
        src = checkpoint.latest(RunDir(ctx.run_dir).checkpoints(source))
        if src is None or not checkpoint.read_state(src).get("complete"):
            raise DvtrainError(
                f"stage {stage} starts from the final weights of stage {source}, which this run has not finished; "
                f"add {source} to stages or resume a run directory that has it"
            )
        checkpoint.load_weights(src, owned)
    return {
        "stage": stage,
        "arch": cfg.model.arch,
        "ensemble_size": cfg.ensemble.size,
        "epoch": 0,
        "step": 0,
        "complete": False,
        "epoch_figures": [],
        "train_s": 0.0,
        "wandb_run_id": None,  # the stage's W&B run, continued on resume
        "shared_generator": checkpoint.generator_to_text(stream(cfg.seed, "shared", stage)),
    }


def run_stage(ctx: Context, name: str, results: dict, guard: SignalGuard, session: dict) -> None:
    started = time.perf_counter()
    cfg, placement = ctx.cfg, ctx.placement
    section = getattr(cfg, name)
    owned = build_owned(cfg, ctx.data, placement.owned, name, ctx.device)
    for i in owned.ids:
        placement.replicas.attach(owned.optimizers[i])
    state = _start_state(ctx, name, owned)
    if state["complete"] and any(row["stage"] == name for row in results["eval"]):
        if placement.is_main:
            print(f"[{name}] complete and evaluated; skipping", flush=True)
        if cfg.logging.artifacts and not state.get("artifact_logged") and resolve_mode(cfg.logging) != "disabled":
            tracker = Tracker(cfg.logging, ctx.run_dir, cfg.name, name, to_dict(cfg) | {"provenance": session},
                              active=placement.is_main, run_id=state.get("wandb_run_id"))
            try:
                upload_artifact(ctx, name, tracker, owned, state, results)
            finally:
                tracker.finish(0)
        return

    shared = checkpoint.generator_from_text(state["shared_generator"])
    timer = PhaseTimer(cfg.logging.step_timing, ctx.device)
    stage = REGISTRY[name](StageRun(name, cfg, owned, placement, placement.replicas, ctx.data, shared, timer))
    path = RunDir(ctx.run_dir).checkpoints(name)
    if state.get("wandb_run_id") is None and resolve_mode(cfg.logging) != "disabled":
        # The stage's W&B run id, checkpointed with its starting point before the run exists: a kill
        # at any later moment resumes this run rather than opening a second one.
        state["wandb_run_id"] = new_run_id()
        checkpoint.save_checkpoint(path, owned, placement, state)
    tracker = Tracker(cfg.logging, ctx.run_dir, cfg.name, name, to_dict(cfg) | {"provenance": session},
                      active=placement.is_main, run_id=state.get("wandb_run_id"))
    history = StepHistory(ctx.run_dir, name, active=placement.is_main)  # kept with W&B off too: training_curves draws it
    exit_code = 1
    try:
        steps_per_epoch = num_batches(len(ctx.data.y_train), section.batch_size, cfg.data.drop_last)
        history.replay(tracker, upto=state["epoch"] * steps_per_epoch + state["step"])
        for epoch in range(state["epoch"], section.epochs):
            # Where this epoch's batches come from, so a checkpoint inside it can replay them.
            epoch_start = checkpoint.generator_to_text(shared)
            data_states = {i: owned.data_generators[i].get_state() for i in owned.ids}
            lr = {set_epoch_lr(owned.optimizers[i], section.optim, epoch) for i in owned.ids}.pop()
            progress = Progress(cfg.logging.progress and placement.is_main, name, epoch, section.epochs, steps_per_epoch)
            log = StepLog(placement, name, epoch)
            main_losses: list[float] = []
            step_in_epoch = state["step"]

            def flush() -> None:
                for step, row in log.flush():
                    main = [v for k, v in row.items() if k.startswith(f"{TRAIN}/{stage.main_loss}/sub")]
                    main_losses.append(sum(main) / len(main))
                    tracker.log(row, step=epoch * steps_per_epoch + step)
                    history.append(epoch * steps_per_epoch + step, row)
                if main_losses:
                    progress.show_loss(main_losses[-1])

            def on_step(figures: StepFigures, images: int) -> None:
                nonlocal step_in_epoch
                step_in_epoch += 1
                log.add(step_in_epoch, figures)
                progress.update(images)
                global_step = epoch * steps_per_epoch + step_in_epoch
                every = cfg.checkpoint.every_steps
                periodic = every > 0 and global_step % every == 0 and step_in_epoch < steps_per_epoch
                if not (periodic or step_in_epoch % cfg.logging.every_steps == 0):
                    return
                flush()  # figures checked before any checkpoint is written
                stop = placement.any(guard.stop_requested)
                if periodic or stop:
                    state.update(epoch=epoch, step=step_in_epoch, shared_generator=epoch_start)
                    checkpoint.save_checkpoint(path, owned, placement, state, data_states)
                if stop:
                    raise StopRequested(f"stopped at {name} epoch {epoch + 1} step {step_in_epoch}")

            with autocast(cfg.compute, ctx.device):  # training only: evaluation stays fp32
                epoch_figures = stage.epoch(epoch, state["step"], on_step)
            flush()
            metrics = test_metrics(owned, placement, ctx.data, cfg.eval.batch_size)
            summary = (
                "".join(f"{k} {v} | " for k, v in epoch_figures.items())
                + f"loss {sum(main_losses) / max(len(main_losses), 1):.4f} | "
                + " ".join(f"{k.split('/')[-1]} {v:.2f}%" for k, v in metrics.items() if "/acc/" in k)
                + (f" | {timer.summary()}" if timer.seconds else "")
            )
            state["train_s"] += progress.close(summary)
            epoch_row = (
                {**metrics, "epoch": epoch + 1}
                | {f"{TRAIN}/{key}": value for key, value in
                   ({"lr": lr, "images_per_s": progress.images_per_s} | epoch_figures).items()}
                | {f"{TRAIN}/time/{phase}_s": seconds for phase, seconds in timer.seconds.items()}
            )
            tracker.log_epoch(epoch_row, step=(epoch + 1) * steps_per_epoch)
            history.append((epoch + 1) * steps_per_epoch, epoch_row, epoch_level=True)
            state.setdefault("epoch_figures", []).append(epoch_figures)
            state.update(
                epoch=epoch + 1, step=0, complete=epoch + 1 == section.epochs,
                shared_generator=checkpoint.generator_to_text(shared),
            )
            checkpoint.save_checkpoint(path, owned, placement, state)
        if not state["complete"]:  # zero epochs: the starting weights are this stage's result
            state["complete"] = True
            checkpoint.save_checkpoint(path, owned, placement, state)
        if placement.is_main:
            training_curves(ctx.run_dir, name, history.path, stage.main_loss, steps_per_epoch)

        results["provenance"] = provenance.record_stage(results.get("provenance"), session, name,
                                                        time.perf_counter() - started)
        rows = evaluate_into(ctx, name, owned, state, results)
        tracker.table("eval/table", rows)
        tracker.summary({f"eval/{metric_name(r['attack'], r['norm'])}/{r['model']}": r["accuracy"] for r in rows}
                        | {f"eval/{metric_name(r['attack'], r['norm'])}/eps": r["eps"] for r in rows})
        tracker.config_update({"provenance": results["provenance"]})
        if cfg.logging.artifacts:
            upload_artifact(ctx, name, tracker, owned, state, results)
        exit_code = 0
    finally:
        tracker.finish(exit_code)


def upload_artifact(ctx: Context, stage: str, tracker: Tracker, owned: Owned, state: dict, results: dict) -> None:
    """The stage's final checkpoint as a W&B model artifact; once W&B took it, the checkpoint's state says
    so (`artifact_logged`), and until then every --resume tries again (a failure is a warning, not an end)."""
    path = RunDir(ctx.run_dir).checkpoints(stage)
    uploaded = tracker.artifact(ctx.cfg.name, "model", checkpoint.latest(path),
                                {"stage": stage, "epochs": state["epoch"], "provenance": results.get("provenance")},
                                suffix=f"-{stage}")
    if ctx.placement.any(uploaded):
        state["artifact_logged"] = True
        checkpoint.save_checkpoint(path, owned, ctx.placement, state)


def evaluate_into(ctx: Context, stage: str, owned: Owned, state: dict, results: dict) -> list[dict]:
    """Attack table of the stage's submodels and mixture, recorded in results.json/results.md.

    The stage's weights are new, so every earlier figure of the stage (either table, and what
    `dvtrain eval` added) is dropped; other stages' rows, written meanwhile by a concurrent `dvtrain
    eval`, are kept (a read-modify-write under the run directory's lock)."""
    start = time.perf_counter()
    rows = evaluate_stage(
        stage, [owned.models[i] for i in owned.ids], ctx.data.x_test, ctx.data.y_test, ctx.cfg.eval, ctx.cfg.seed,
        ctx.placement,
    )
    rows = [r | {"table": TRAIN_TABLE, "command": "dvtrain train"} for r in rows]
    images = state["epoch"] * len(ctx.data.y_train)
    info = {
        "epochs": state["epoch"],
        "train_s": round(state["train_s"], 2),
        "images_per_s": round(images / state["train_s"], 1) if state["train_s"] > 0 else None,
        "eval_s": round(time.perf_counter() - start, 2),
    }

    stage_provenance = results.get("provenance")  # read now: the main process replaces `results` below

    def change(stored: dict) -> None:
        stored["eval"] = [r for r in stored["eval"] if r["stage"] != stage] + rows
        for key in FULL_EVALUATION_KEYS:  # figures of the stage's previous weights are stale now
            stored.get(key, {}).pop(stage, None)
        stored["stages"][stage] = info
        stored["provenance"] = stage_provenance

    if ctx.placement.is_main:
        results.clear()
        results.update(update_results(ctx.run_dir, ctx.cfg, change))
        print(results_markdown(rows), flush=True)
    else:
        change(results)
    return rows


def train(ctx: Context) -> dict:
    results = load_results(ctx.run_dir)
    session = provenance.session(ctx.cfg, ctx.device, launched_world_size())
    with SignalGuard() as guard:
        for stage in ctx.cfg.stages:
            run_stage(ctx, stage, results, guard, session)
    sync = sync_command(ctx.run_dir) if resolve_mode(ctx.cfg.logging) == "offline" else None
    if ctx.placement.is_main and sync is not None:
        print(f"W&B runs are offline; upload them with: {sync}", flush=True)
    return results


def train_in_process(run_dir: Path, cfg: Config, data: Dataset, device: torch.device) -> dict:
    """Train (or resume) `cfg`'s stages in RUN_DIR in this one process, exactly as `dvtrain train` does
    (checkpoints, Ctrl-C handling, results.json). The caller has written RUN_DIR/config.yaml. What
    `dvtrain eval` hands to evaluation to train its surrogate ensembles (`dvtrain.eval.surrogates`)."""
    return train(Context(cfg, Path(run_dir), data, LocalPlacement(cfg.ensemble.size), device))
