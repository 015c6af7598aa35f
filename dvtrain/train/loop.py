"""The stage loop: composes data, submodels, the stage algorithms, checkpoints, tracking and evaluation.

For each configured stage (vanilla, the adp/gal/trs baselines, dverge, dverge_advt): restore its
checkpoint or start it from the weights of the stage it builds on (or from fresh weights), train the
remaining epochs (checkpointing at epoch ends and every `checkpoint.every_steps` steps; Ctrl-C checkpoints the step it is in), then evaluate the submodels and their mixture and record the table in `results.json`/`results.md`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dvtrain import checkpoint
from dvtrain.train.baselines import baseline_epoch
from dvtrain.compute import autocast
from dvtrain.config import BASELINES, Config, DvergeConfig, to_dict
from dvtrain.data import Dataset, num_batches
from dvtrain.train.dverge import dverge_epoch
from dvtrain.train.engines import make_engine
from dvtrain.submodels import Owned
from dvtrain.train.optim import build_owned, set_epoch_lr
from dvtrain.errors import DvtrainError
from dvtrain.eval.report import FULL_EVALUATION_KEYS, load_results, metric_name, results_markdown, save_results
from dvtrain.eval.whitebox import evaluate_stage
from dvtrain.mixture import mixture_log_probs
from dvtrain.distributed.placement import Placement
from dvtrain.train.vanilla import vanilla_epoch
from dvtrain.rng import stream
from dvtrain.signals import SignalGuard, StopRequested
from dvtrain.timing import PhaseTimer
from dvtrain.tracking import Progress, Tracker


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
        model = owned.models[i]
        was_training = model.training
        model.eval()
        logits.append(torch.cat([model(data.x_test[s : s + batch_size]) for s in range(0, len(data.y_test), batch_size)]))
        model.train(was_training)
    every = placement.all_gather(torch.stack(logits))  # [size, N, K]
    y = data.y_test
    out = {f"test/acc/sub{i}": float((every[i].argmax(1) == y).float().mean() * 100) for i in range(placement.size)}
    log_probs = mixture_log_probs(every)
    out["test/acc/mixture"] = float((log_probs.argmax(1) == y).float().mean() * 100)
    out["test/loss/mixture"] = float(F.nll_loss(log_probs, y))
    return out


def _flatten_step(values: dict[str, Tensor]) -> dict[str, float]:
    out = {}
    for name, value in values.items():
        if value.ndim == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}/sub{i}": float(v) for i, v in enumerate(value.tolist())})
    return out


def _check_finite(values: dict[str, Tensor], stage: str, epoch: int, step: int) -> None:
    for name, value in values.items():
        bad = (~torch.isfinite(value.reshape(-1))).nonzero().flatten().tolist()
        if bad:
            where = f"submodel {bad[0]}" if value.ndim else "the mixture"
            raise NonFiniteLoss(
                f"{name} of {where} is not finite at {stage} epoch {epoch + 1} step {step}; "
                f"the last good checkpoint is kept; lower {stage}.optim.lr "
                "and start again (or resume a copy of the run with the config edited)"
            )


def _start_state(ctx: Context, stage: str, owned: Owned) -> dict:
    """Restore the stage's own checkpoint, or start it from the weights of the stage it builds on."""
    cfg = ctx.cfg
    path = checkpoint.latest(checkpoint.stage_dir(ctx.run_dir, stage))
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
    source = None if stage == "vanilla" else cfg.stage_config(stage).init_from
    if source is not None:  # None: the fresh initialisation build_owned made
        src = checkpoint.latest(checkpoint.stage_dir(ctx.run_dir, source))
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
        "layers": [],
        "train_s": 0.0,
        "shared_generator": checkpoint.generator_to_text(stream(cfg.seed, "shared", stage)),
    }


def run_stage(ctx: Context, stage: str, results: dict, guard: SignalGuard) -> None:
    cfg, placement = ctx.cfg, ctx.placement
    scfg = cfg.stage_config(stage)
    owned = build_owned(cfg, ctx.data, placement.owned, stage, ctx.device)
    num_layers = owned.models[owned.ids[0]].num_layers
    if isinstance(scfg, DvergeConfig) and scfg.layer is not None and scfg.layer > num_layers:
        raise DvtrainError(f"{stage}.layer={scfg.layer} is out of range: {cfg.model.arch} has layers 1..{num_layers}")
    state = _start_state(ctx, stage, owned)
    evaluated = any(row["stage"] == stage for row in results["eval"])
    if state["complete"] and evaluated:
        if placement.is_main:
            print(f"[{stage}] complete and evaluated; skipping", flush=True)
        return

    path = checkpoint.stage_dir(ctx.run_dir, stage)
    tracker = Tracker(cfg.logging, ctx.run_dir, cfg.name, stage, to_dict(cfg), active=placement.is_main)
    exit_code = 1
    try:
        shared = checkpoint.generator_from_text(state["shared_generator"])
        padding = cfg.data.crop_padding if cfg.data.augment else None
        # One engine for the whole stage: it keeps its wide network (and compiled graphs) between epochs.
        engine = make_engine(scfg.engine, cfg.compute) if isinstance(scfg, DvergeConfig) else None
        steps_per_epoch = num_batches(len(ctx.data.y_train), scfg.batch_size)
        for epoch in range(state["epoch"], scfg.epochs):
            # Where this epoch's batches come from, so a checkpoint inside it can replay them.
            epoch_start = checkpoint.generator_to_text(shared)
            data_states = {i: owned.data_generators[i].get_state() for i in owned.ids}
            skip = state["step"]
            lrs = {set_epoch_lr(owned.optimizers[i], scfg.optim, epoch) for i in owned.ids}
            progress = Progress(cfg.logging.progress and placement.is_main, stage, epoch, scfg.epochs, steps_per_epoch)
            step_in_epoch = skip
            epoch_losses: list[float] = []
            timer = PhaseTimer(cfg.logging.step_timing, ctx.device)

            def on_step(values: dict[str, Tensor], images: int) -> None:
                nonlocal step_in_epoch
                step_in_epoch += 1
                global_step = epoch * steps_per_epoch + step_in_epoch
                _check_finite(values, stage, epoch, step_in_epoch)
                main_loss = values["loss/dverge" if "loss/dverge" in values else "loss/clean"].mean().item()
                epoch_losses.append(main_loss)
                progress.update(images, main_loss)
                tracker.log(_flatten_step(values), step=global_step)
                every = cfg.checkpoint.every_steps
                periodic = every > 0 and global_step % every == 0 and step_in_epoch < steps_per_epoch
                stop = placement.any(guard.stop_requested)
                if periodic or stop:
                    state.update(epoch=epoch, step=step_in_epoch, shared_generator=epoch_start)
                    checkpoint.save_checkpoint(path, owned, placement, state, data_states)
                if stop:
                    raise StopRequested(f"stopped at {stage} epoch {epoch + 1} step {step_in_epoch}")

            with autocast(cfg.compute, ctx.device):  # training only: evaluation stays fp32
                layer = None
                if stage == "vanilla":
                    vanilla_epoch(owned, placement, ctx.data, scfg, padding, on_step, skip)
                elif stage in BASELINES:
                    baseline_epoch(stage, owned, placement, ctx.data, scfg, padding, shared, epoch, on_step, skip)
                else:
                    layer = dverge_epoch(
                        owned, placement, ctx.data, scfg, num_layers, padding, shared, engine, on_step, timer, skip,
                    )
            metrics = test_metrics(owned, placement, ctx.data, cfg.eval.batch_size)
            summary = (
                (f"layer {layer} | " if layer is not None else "")
                + f"loss {sum(epoch_losses) / max(len(epoch_losses), 1):.4f} | "
                + " ".join(f"{k.split('/')[-1]} {v:.2f}%" for k, v in metrics.items() if "/acc/" in k)
                + (f" | {timer.summary()}" if timer.seconds else "")
            )
            state["train_s"] += progress.close(summary)
            tracker.log(
                {**metrics, "epoch": epoch + 1, "lr": lrs.pop(), "images_per_s": progress.images_per_s}
                | {f"time/{phase}_s": seconds for phase, seconds in timer.seconds.items()}
                | ({"layer": layer} if layer is not None else {}),
                step=(epoch + 1) * steps_per_epoch,
            )
            state["layers"].append(layer)
            state.update(
                epoch=epoch + 1, step=0, complete=epoch + 1 == scfg.epochs,
                shared_generator=checkpoint.generator_to_text(shared),
            )
            checkpoint.save_checkpoint(path, owned, placement, state)
        if not state["complete"]:  # zero epochs: the starting weights are this stage's result
            state["complete"] = True
            checkpoint.save_checkpoint(path, owned, placement, state)

        rows = evaluate_into(ctx, stage, owned, state, results)
        tracker.summary({f"eval/{r['model']}/{metric_name(r['attack'], r['norm'])}": r["accuracy"] for r in rows})
        exit_code = 0
    finally:
        tracker.finish(exit_code)


def evaluate_into(ctx: Context, stage: str, owned: Owned, state: dict, results: dict) -> list[dict]:
    """Attack table of the stage's submodels and mixture, recorded in results.json/results.md."""
    start = time.perf_counter()
    rows = evaluate_stage(
        stage, [owned.models[i] for i in owned.ids], ctx.data.x_test, ctx.data.y_test, ctx.cfg.eval, ctx.cfg.seed,
        ctx.placement,
    )
    results["eval"] = [r for r in results["eval"] if r["stage"] != stage] + rows
    for key in FULL_EVALUATION_KEYS:  # figures of the stage's previous weights are stale now
        results.get(key, {}).pop(stage, None)
    images = state["epoch"] * len(ctx.data.y_train)
    results["stages"][stage] = {
        "epochs": state["epoch"],
        "train_s": round(state["train_s"], 2),
        "images_per_s": round(images / state["train_s"], 1) if state["train_s"] > 0 else None,
        "eval_s": round(time.perf_counter() - start, 2),
    }
    if ctx.placement.is_main:
        save_results(ctx.run_dir, ctx.cfg, results)
        print(results_markdown(rows), flush=True)
    return rows


def train(ctx: Context) -> dict:
    results = load_results(ctx.run_dir)
    with SignalGuard() as guard:
        for stage in ctx.cfg.stages:
            run_stage(ctx, stage, results, guard)
    return results
