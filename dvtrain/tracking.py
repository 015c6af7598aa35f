"""Weights & Biases runs and the terminal progress display.

One W&B run per stage (job type = the stage), grouped by the experiment's name (group = `name`, by
default the run directory's name), so the W&B UI lays vanilla, DVERGE and DVERGE+AdvT side by side.
A resumed stage continues its run: the run id is kept in the stage's checkpoint. Keys:
`train/<metric>/sub<i>` and `train/<metric>/mixture` per step, `test/<metric>/<model>` per epoch
(plotted against `epoch`), `eval/<attack>/<model>` in the summary. Without an API key,
`logging.wandb=auto` logs offline (no account, no network); the files sit in `<run_dir>/wandb/` and
`wandb sync` uploads them later. Only the main process logs.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import re
import secrets
import shlex
import string
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dvtrain import storage
from dvtrain.config import LoggingConfig
from dvtrain.errors import DvtrainError
from dvtrain.rundir import RunDir

PROGRESS_ENV = "DVTRAIN_PROGRESS"  # 1: progress bars off a terminal too (logs, captured output)

WANDB_HOST = "api.wandb.ai"
OFFLINE_RUN_GLOB = "offline-run-*"
RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
RUN_ID_LENGTH = 8
# Names W&B accepts. Artifacts: at most 128 characters (wandb.sdk.artifacts._validators.NAME_MAXLEN, wandb
# 0.31) of ASCII letters, digits, '-', '_' and '.' (the server's rule; the client refuses '/' only). Run names
# and groups: capped at the same length; job types (stage names) at 64.
ARTIFACT_NAME_MAX = 128
RUN_NAME_MAX = 128
JOB_TYPE_MAX = 64
NOT_IN_ARTIFACT_NAMES = re.compile(r"[^A-Za-z0-9_.-]")
NAME_HASH_LENGTH = 8


def fit_name(name: str, limit: int, keep: str = "", ascii_only: bool = False) -> str:
    """`name` + `keep` made valid for W&B: characters outside W&B's artifact alphabet replaced by '_' (with
    `ascii_only`), and at most `limit` characters, `keep` (e.g. "-dverge") always whole. A name that had to
    be changed ends in a short hash of the original, so two long or non-ASCII names stay distinct."""
    whole = name + keep
    fitted = NOT_IN_ARTIFACT_NAMES.sub("_", whole) if ascii_only else whole
    if fitted == whole and len(fitted) <= limit:
        return fitted
    digest = "-" + hashlib.sha1(whole.encode()).hexdigest()[:NAME_HASH_LENGTH]
    stem = NOT_IN_ARTIFACT_NAMES.sub("_", name) if ascii_only else name
    return stem[: max(limit - len(keep) - len(digest), 1)] + digest + keep


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: LoggingConfig) -> str:
    if cfg.wandb == "auto":
        return "online" if has_wandb_key() else "offline"
    if cfg.wandb == "online" and not has_wandb_key():
        raise DvtrainError(
            "logging.wandb=online but no W&B API key is configured; run `wandb login`, set WANDB_API_KEY, "
            "or use logging.wandb=offline"
        )
    return cfg.wandb


def new_run_id() -> str:
    """A fresh W&B run id (8 characters of [a-z0-9], as W&B makes them)."""
    return "".join(secrets.choice(RUN_ID_ALPHABET) for _ in range(RUN_ID_LENGTH))


class Tracker:
    """A W&B run for one stage, or nothing (disabled, or not the main process).

    A stage's run id is the tracker's: `stage_run_id` gives the one its checkpoint holds or mints a new
    one, which the stage loop checkpoints before the run exists, so that a kill at any later moment
    resumes this run rather than opening a second one.

    `run_id`: the stage's run id (kept in its checkpoint); a run with this id that already exists is
    continued (`resume="allow"`), and steps W&B already holds (online) are not logged twice."""

    @staticmethod
    def stage_run_id(cfg: LoggingConfig, kept: str | None) -> str | None:
        """The stage's W&B run id: `kept` (from its checkpoint), else a new one; None with W&B disabled."""
        if kept is not None or resolve_mode(cfg) == "disabled":
            return kept
        return new_run_id()

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, stage: str, config: dict, active: bool,
                 run_id: str | None = None):
        self.run = None
        self.offline_folder: Path | None = None
        self.resumed_step = 0
        self.epoch_keys: set[str] = set()
        self.mode = resolve_mode(cfg)
        if not active or self.mode == "disabled":
            return
        import wandb

        wandb_dir = RunDir(run_dir).wandb
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            os.environ.setdefault(var, str(wandb_dir / ".local"))
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=fit_name(run_name, RUN_NAME_MAX),
                name=fit_name(run_name, RUN_NAME_MAX, keep=f"-{stage}"),
                job_type=fit_name(stage, JOB_TYPE_MAX),
                config=config,
                dir=str(run_dir),
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True),
            )
        except Exception as exc:  # wandb raises many types for network/auth failures
            raise DvtrainError(
                f"W&B could not start in {self.mode} mode ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "use logging.wandb=offline and `wandb sync` later"
            ) from None
        # Online, a resumed run knows its last step; offline it starts at 0 and the pieces merge on sync.
        self.resumed_step = self.run.step
        # An offline run's folder (wandb/offline-run-<time>-<id>; run.dir is its files/ subfolder), kept for
        # the sync hint after `finish`.
        self.offline_folder = Path(self.run.dir).parent if self.mode == "offline" else None
        self.run.define_metric("epoch")

    def log(self, values: dict, step: int) -> None:
        if self.run is not None and step >= self.resumed_step:
            self.run.log(values, step=step)

    def log_epoch(self, values: dict, step: int) -> None:
        """Epoch-level figures: plotted against `epoch` (which `values` must hold) in the W&B UI."""
        if self.run is None:
            return
        for key in values.keys() - self.epoch_keys - {"epoch"}:
            self.run.define_metric(key, step_metric="epoch")
            self.epoch_keys.add(key)
        self.log(values, step)

    def table(self, key: str, rows: list[dict]) -> None:
        """Rows of equal keys as a wandb.Table (the final evaluation table of a stage)."""
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.run.log({key: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def config_update(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def artifact(self, name: str, kind: str, folder: Path, metadata: dict, suffix: str = "") -> bool:
        """Upload a folder (a checkpoint) as a W&B artifact named `name` + `suffix`, made valid (`fit_name`:
        the suffix, e.g. "-dverge", is kept whole). Returns
        whether W&B took it; a failure (a folder W&B cannot stage into, the network, ...) is one warning line
        and False, so the run goes on and a later --resume can try again."""
        if self.run is None:
            return False
        import wandb

        try:
            artifact = wandb.Artifact(fit_name(name, ARTIFACT_NAME_MAX, suffix, ascii_only=True), type=kind, metadata=metadata)
            artifact.add_dir(str(folder))
            self.run.log_artifact(artifact)
        except Exception as exc:  # noqa: BLE001 - wandb raises many types; none may cost the trained stage
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            print(f"dvtrain: warning: W&B artifact {name + suffix!r} not uploaded ({type(exc).__name__}: {first}); "
                  "the checkpoint is safe on disk; --resume tries again", file=sys.stderr, flush=True)
            return False
        return True

    def sync_hint(self) -> str | None:
        """'the W&B run is offline in FOLDER; upload it with: wandb sync FOLDER' for an offline run, None
        otherwise (online, disabled, or not started)."""
        if self.offline_folder is None:
            return None
        folder = shlex.quote(str(self.offline_folder))
        return f"the W&B run is offline in {folder}; upload it with: wandb sync {folder}"

    def finish(self, exit_code: int = 0) -> None:
        """Finish and flush: `finish` alone can return before the run file is written; `teardown` waits."""
        if self.run is None:
            return
        import wandb

        self.run.finish(exit_code=exit_code)
        wandb.teardown()
        self.run = None


class StepHistory:
    """Every row a stage logged, appended to `<run_dir>/wandb/<stage>-history.jsonl` and synced to disk
    before the checkpoint that covers it.

    W&B's writer buffers: a kill -9 loses what it had not written yet, offline easily the whole run so
    far. A resumed stage logs this history again up to its checkpoint (online, W&B skips the steps it
    holds), so its run's steps have no gap."""

    def __init__(self, run_dir: Path, stage: str, active: bool) -> None:
        self.path = RunDir(run_dir).wandb / f"{stage}-history.jsonl"
        self.active = active
        if active:  # W&B off: the history still feeds the training curves (dvtrain.train.curves)
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, step: int, row: dict, epoch_level: bool = False) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "row": row, "epoch": epoch_level}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self, tracker: "Tracker", upto: int) -> None:
        """Log the rows of steps 1..`upto` (the checkpoint's) again and forget later ones, which the
        resumed run recomputes. A line torn by the kill is dropped."""
        if not self.active or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry["step"] <= upto:
                kept.append(entry)
        storage.write_atomic(self.path, "".join(json.dumps(entry) + "\n" for entry in kept))
        if tracker.run is None:  # W&B off: the history is kept for the loss curves, nothing to log again
            return
        for entry in kept:
            (tracker.log_epoch if entry["epoch"] else tracker.log)(entry["row"], entry["step"])


def sync_command(run_dir: Path) -> str | None:
    """The `wandb sync` command that uploads a run directory's offline W&B runs (a resumed stage's
    pieces in the order they were written), or None when it has none."""
    wandb_dir = RunDir(run_dir).wandb
    if not any(wandb_dir.glob(OFFLINE_RUN_GLOB)):
        return None
    return f"wandb sync {shlex.quote(str(wandb_dir))}/{OFFLINE_RUN_GLOB}"


class Progress:
    """A progress bar per epoch with loss and images/s, and one summary line when the epoch ends."""

    def __init__(self, enabled: bool, stage: str, epoch: int, epochs: int, total_steps: int):
        self.stage, self.epoch, self.epochs = stage, epoch, epochs
        self.enabled = enabled
        self.images = 0
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total_steps,
            desc=f"{stage} {epoch + 1}/{epochs}",
            leave=False,
            # like `dvtrain eval`'s phases: on a terminal, or anywhere with DVTRAIN_PROGRESS=1
            disable=True if not enabled else (False if os.environ.get(PROGRESS_ENV) == "1" else None),
            dynamic_ncols=True,
        )

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def update(self, images: int) -> None:
        self.images += images
        self.bar.update(1)

    def show_loss(self, loss: float) -> None:
        """The latest reduced main loss (figures are reduced every `logging.every_steps` steps)."""
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{self.images_per_s:.0f}", refresh=False)

    def close(self, summary: str) -> float:
        elapsed = time.perf_counter() - self.start
        self.bar.close()
        if self.enabled:
            print(f"[{self.stage} {self.epoch + 1}/{self.epochs}] {summary} | {self.images_per_s:.0f} img/s | {elapsed:.1f}s", flush=True)
        return elapsed
