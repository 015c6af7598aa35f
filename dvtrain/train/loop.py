"""The stage loop: composes data, submodels, the stages, checkpoints, tracking and evaluation.

For each configured stage (`dvtrain.stages`): restore its checkpoint or start it from the
weights of the stage it builds on (or from fresh weights), train the remaining epochs (checkpointing at
epoch ends and every `checkpoint.every_steps` steps; Ctrl-C checkpoints where it stops), then evaluate
the submodels and their mixture and record the table in `results.json`/`results.md`. The loop knows no
stage by name: a stage is its class in the registry, and the loop owns the frame around its steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dvtrain import checkpoint, prechecks, provenance
from dvtrain import stages as stage_registry
from dvtrain.compute import autocast
from dvtrain.config import Config, to_dict
from dvtrain.data import Dataset, num_batches
from dvtrain.distributed.placement import LocalPlacement, Placement
from dvtrain.distributed.runtime import launched_world_size
from dvtrain.errors import DvtrainError
from dvtrain.eval.report import (
    TRAIN_TABLE, load_results, metric_name, results_markdown, update_results,
)
from dvtrain.eval.whitebox import evaluate_stage
from dvtrain.mixture import mixture_log_probs
from dvtrain.models import training_mode
from dvtrain.results import forget_stage
from dvtrain.rng import stream
from dvtrain.rundir import RunDir
from dvtrain.signals import SignalGuard, StopRequested
from dvtrain.submodels import Owned
from dvtrain.timing import PhaseTimer
from dvtrain.tracking import Progress, StepHistory, Tracker, resolve_mode, sync_command
from dvtrain.train.curves import training_curves
from dvtrain.train.optim import build_owned, set_epoch_lr
from dvtrain.train.frame import StepRunner, resumed
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


@dataclasses.dataclass
class TrainState:
    """A stage's progress: what its checkpoint's state.json holds (torchtitan's `Stateful` idea: the
    state reads and writes its own JSON). `epoch`/`step`: where training continues (steps done in that
    epoch); `shared_generator`: the shared stream at the start of that epoch (its batches are replayed);
    `wandb_run_id`: the stage's W&B run, continued on resume."""

    stage: str
    arch: str
    ensemble_size: int
    epoch: int = 0
    step: int = 0
    complete: bool = False
    epoch_figures: list[dict] = dataclasses.field(default_factory=list)
    train_s: float = 0.0
    wandb_run_id: str | None = None
    shared_generator: str = ""
    artifact_logged: bool = False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, values: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def fresh(cls, cfg: Config, stage: str) -> TrainState:
        shared = checkpoint.generator_to_text(stream(cfg.seed, "shared", stage))
        return cls(stage, cfg.model.arch, cfg.ensemble.size, shared_generator=shared)


@dataclasses.dataclass
class CheckpointPolicy:
    """When the stage loop reduces the step figures and checkpoints: figures every `logging.every_steps`
    steps (Ctrl-C is answered there too), a checkpoint every `checkpoint.every_steps` optimizer steps
    counted over the whole stage (0: none inside epochs) and at every epoch end."""

    every_steps: int
    log_every: int
    steps_per_epoch: int

    def periodic(self, epoch: int, step: int) -> bool:
        """A checkpoint is due after `step` steps of `epoch` (epoch ends are checkpointed anyway)."""
        done = epoch * self.steps_per_epoch + step
        return self.every_steps > 0 and done % self.every_steps == 0 and step < self.steps_per_epoch

    def reduce(self, epoch: int, step: int) -> bool:
        """The figures are reduced (and checked) after `step` steps of `epoch`: before any checkpoint."""
        return self.periodic(epoch, step) or step % self.log_every == 0


def start_state(ctx: Context, stage: str, owned: Owned) -> TrainState:
    """Restore the stage's own checkpoint, or start it from the weights of the stage it builds on."""
    path = prechecks.check_start(ctx.cfg, ctx.run_dir, stage)
    if path is not None:
        checkpoint.load_weights(path, owned)
        checkpoint.load_resume_state(path, owned)
        return TrainState.from_state_dict(checkpoint.read_state(path))
    source = ctx.cfg.section(stage).init_from
    if source is not None:  # None: the fresh initialisation build_owned made
        checkpoint.load_weights(checkpoint.latest(RunDir(ctx.run_dir).checkpoints(source)), owned)
    return TrainState.fresh(ctx.cfg, stage)


class StageTraining:
    """One stage's training: the frame around its steps (resume, replicas, the optimizer update, figures,
    checkpoints, the training state), then its evaluation."""

    def __init__(self, ctx: Context, name: str, owned: Owned, state: TrainState, guard: SignalGuard, session: dict):
        self.ctx, self.name, self.owned, self.state, self.guard = ctx, name, owned, state, guard
        cfg, placement = ctx.cfg, ctx.placement
        self.section = cfg.section(name)
        self.path = RunDir(ctx.run_dir).checkpoints(name)
        self.shared = checkpoint.generator_from_text(state.shared_generator)
        self.timer = PhaseTimer(cfg.logging.step_timing, ctx.device)
        run = StageRun(name, cfg, owned, placement, placement.replicas, ctx.data, self.shared, self.timer)
        self.stage = stage_registry.spec(name).trainer_class()(run)
        self.steps = StepRunner(self.stage, owned, placement, cfg.compute.cuda_graphs, self.timer)
        self.steps_per_epoch = num_batches(len(ctx.data.y_train), self.section.batch_size, cfg.data.drop_last)
        self.policy = CheckpointPolicy(cfg.checkpoint.every_steps, cfg.logging.every_steps, self.steps_per_epoch)
        run_id = Tracker.stage_run_id(cfg.logging, state.wandb_run_id)
        if run_id != state.wandb_run_id:  # checkpointed with its starting point before the W&B run exists
            state.wandb_run_id = run_id
            self.save()
        self.tracker = Tracker(cfg.logging, ctx.run_dir, cfg.name, name, to_dict(cfg) | {"provenance": session},
                               active=placement.is_main, run_id=state.wandb_run_id)
        # Kept with W&B off too: training_curves draws it.
        self.history = StepHistory(ctx.run_dir, name, active=placement.is_main)

    def save(self, data_states: dict | None = None) -> None:
        checkpoint.save_checkpoint(self.path, self.owned, self.ctx.placement, self.state.state_dict(), data_states)

    def train(self) -> None:
        """The remaining epochs; the stage is complete after them (with zero epochs: its starting weights)."""
        self.history.replay(self.tracker, upto=self.state.epoch * self.steps_per_epoch + self.state.step)
        for epoch in range(self.state.epoch, self.section.epochs):
            self.epoch(epoch)
        if not self.state.complete:
            self.state.complete = True
            self.save()
        if self.ctx.placement.is_main:
            training_curves(self.ctx.run_dir, self.name, self.history.path, self.stage.main_loss, self.steps_per_epoch)

    def epoch(self, epoch: int) -> None:
        owned, placement, cfg = self.owned, self.ctx.placement, self.ctx.cfg
        # Where this epoch's batches come from, so a checkpoint inside it can replay them.
        epoch_start = checkpoint.generator_to_text(self.shared)
        data_states = {i: owned.data_generators[i].get_state() for i in owned.ids}
        lr = {set_epoch_lr(owned.optimizers[i], self.section.optim, epoch) for i in owned.ids}.pop()
        progress = Progress(cfg.logging.progress and placement.is_main, self.name, epoch, self.section.epochs,
                            self.steps_per_epoch)
        log, main_losses = StepLog(placement, self.name, epoch), []
        with autocast(cfg.compute, self.ctx.device):  # training only: evaluation stays fp32
            for step, batch in resumed(self.stage.batches(epoch), self.state.step):
                figures, images = self.steps(batch)
                log.add(step + 1, figures)
                progress.update(images)
                if not self.policy.reduce(epoch, step + 1):
                    continue
                self.flush(log, epoch, progress, main_losses)  # figures checked before any checkpoint is written
                stop = placement.any(self.guard.stop_requested)
                if self.policy.periodic(epoch, step + 1) or stop:
                    self.state.epoch, self.state.step, self.state.shared_generator = epoch, step + 1, epoch_start
                    self.save(data_states)
                if stop:
                    raise StopRequested(f"stopped at {self.name} epoch {epoch + 1} step {step + 1}")
        self.flush(log, epoch, progress, main_losses)
        self.end_epoch(epoch, lr, progress, main_losses)

    def flush(self, log: StepLog, epoch: int, progress: Progress, main_losses: list[float]) -> None:
        for step, row in log.flush():
            main = [v for k, v in row.items() if k.startswith(f"{TRAIN}/{self.stage.main_loss}/sub")]
            main_losses.append(sum(main) / len(main))
            self.tracker.log(row, step=epoch * self.steps_per_epoch + step)
            self.history.append(epoch * self.steps_per_epoch + step, row)
        if main_losses:
            progress.show_loss(main_losses[-1])

    def end_epoch(self, epoch: int, lr: float, progress: Progress, main_losses: list[float]) -> None:
        """The epoch's test figures and summary line, logged; the state advanced and checkpointed."""
        epoch_figures, timer = self.stage.epoch_figures(), self.timer
        metrics = test_metrics(self.owned, self.ctx.placement, self.ctx.data, self.ctx.cfg.eval.batch_size)
        summary = (
            "".join(f"{k} {v} | " for k, v in epoch_figures.items())
            + f"loss {sum(main_losses) / max(len(main_losses), 1):.4f} | "
            + " ".join(f"{k.split('/')[-1]} {v:.2f}%" for k, v in metrics.items() if "/acc/" in k)
            + (f" | {timer.summary()}" if timer.seconds else "")
        )
        self.state.train_s += progress.close(summary)
        epoch_row = (
            {**metrics, "epoch": epoch + 1}
            | {f"{TRAIN}/{key}": value for key, value in
               ({"lr": lr, "images_per_s": progress.images_per_s} | epoch_figures).items()}
            | {f"{TRAIN}/time/{phase}_s": seconds for phase, seconds in timer.seconds.items()}
        )
        self.tracker.log_epoch(epoch_row, step=(epoch + 1) * self.steps_per_epoch)
        self.history.append((epoch + 1) * self.steps_per_epoch, epoch_row, epoch_level=True)
        self.state.epoch_figures.append(epoch_figures)
        self.state.epoch, self.state.step = epoch + 1, 0
        self.state.complete = epoch + 1 == self.section.epochs
        self.state.shared_generator = checkpoint.generator_to_text(self.shared)
        self.save()

    def evaluate(self, results: dict, session: dict, seconds: float) -> None:
        """The stage's quick white-box table into results.json, W&B's table and summary, and its artifact."""
        ctx, name, tracker = self.ctx, self.name, self.tracker
        results["provenance"] = provenance.record_stage(results.get("provenance"), session, name, seconds)
        rows = evaluate_into(ctx, name, self.owned, self.state, results)
        tracker.table("eval/table", rows)
        tracker.summary({f"eval/{metric_name(r['attack'], r['norm'])}/{r['model']}": r["accuracy"] for r in rows}
                        | {f"eval/{metric_name(r['attack'], r['norm'])}/eps": r["eps"] for r in rows})
        tracker.config_update({"provenance": results["provenance"]})
        if ctx.cfg.logging.artifacts:
            upload_artifact(ctx, name, tracker, self.owned, self.state, results)


def run_stage(ctx: Context, name: str, results: dict, guard: SignalGuard, session: dict) -> None:
    """Train (or resume) stage `name`, then evaluate it into `results`; a stage finished and evaluated
    earlier is passed over (uploading its artifact if W&B has not taken it yet)."""
    started = time.perf_counter()
    owned = build_owned(ctx.cfg, ctx.data, ctx.placement.owned, name, ctx.device)
    for i in owned.ids:
        ctx.placement.replicas.attach(owned.optimizers[i])
    state = start_state(ctx, name, owned)
    if state.complete and any(row["stage"] == name for row in results["eval"]):
        if ctx.placement.is_main:
            print(f"[{name}] complete and evaluated; skipping", flush=True)
        if ctx.cfg.logging.artifacts and not state.artifact_logged and resolve_mode(ctx.cfg.logging) != "disabled":
            upload_final_artifact(ctx, name, owned, state, results, session)
        return
    training = StageTraining(ctx, name, owned, state, guard, session)
    exit_code = 1
    try:
        training.train()
        training.evaluate(results, session, time.perf_counter() - started)
        exit_code = 0
    finally:
        training.tracker.finish(exit_code)


def upload_final_artifact(ctx: Context, name: str, owned: Owned, state: TrainState, results: dict,
                          session: dict) -> None:
    """A finished stage's artifact that W&B did not take earlier, in the stage's own W&B run."""
    tracker = Tracker(ctx.cfg.logging, ctx.run_dir, ctx.cfg.name, name, to_dict(ctx.cfg) | {"provenance": session},
                      active=ctx.placement.is_main, run_id=state.wandb_run_id)
    try:
        upload_artifact(ctx, name, tracker, owned, state, results)
    finally:
        tracker.finish(0)


def upload_artifact(ctx: Context, stage: str, tracker: Tracker, owned: Owned, state: TrainState, results: dict) -> None:
    """The stage's final checkpoint as a W&B model artifact; once W&B took it, the checkpoint's state says
    so (`artifact_logged`), and until then every --resume tries again (a failure is a warning, not an end)."""
    path = RunDir(ctx.run_dir).checkpoints(stage)
    uploaded = tracker.artifact(ctx.cfg.name, "model", checkpoint.latest(path),
                                {"stage": stage, "epochs": state.epoch, "provenance": results.get("provenance")},
                                suffix=f"-{stage}")
    if ctx.placement.any(uploaded):
        state.artifact_logged = True
        checkpoint.save_checkpoint(path, owned, ctx.placement, state.state_dict())


def evaluate_into(ctx: Context, stage: str, owned: Owned, state: TrainState, results: dict) -> list[dict]:
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
    images = state.epoch * len(ctx.data.y_train)
    info = {
        "epochs": state.epoch,
        "train_s": round(state.train_s, 2),
        "images_per_s": round(images / state.train_s, 1) if state.train_s > 0 else None,
        "eval_s": round(time.perf_counter() - start, 2),
    }

    stage_provenance = results.get("provenance")  # read now: the main process replaces `results` below

    def change(stored: dict) -> None:
        # Every number and figure link of the stage's previous weights is stale now, plug-in tables' included
        # even where the plug-in is not installed here (the store lists their sections).
        forget_stage(stored, stage)
        stored["eval"] += rows
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
