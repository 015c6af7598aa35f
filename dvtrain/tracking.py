"""Weights & Biases runs and the terminal progress display.

One W&B run per stage, grouped by the run name, so the W&B UI lays vanilla, DVERGE and DVERGE+AdvT
side by side. Without an API key, `logging.wandb=auto` logs offline (no account, no network); the
files sit in `<run_dir>/wandb/` and `wandb sync` uploads them later. Only the main process logs.
"""

from __future__ import annotations

import json
import netrc
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dvtrain.config import LoggingConfig
from dvtrain.errors import DvtrainError

WANDB_HOST = "api.wandb.ai"


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


class Tracker:
    """A W&B run for one stage, or nothing (disabled, or not the main process)."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, stage: str, config: dict, active: bool):
        self.run = None
        mode = resolve_mode(cfg)
        if not active or mode == "disabled":
            return
        import wandb

        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            os.environ.setdefault(var, str(wandb_dir / ".local"))
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=run_name,
                name=f"{run_name}-{stage}",
                job_type=stage,
                config=config,
                dir=str(run_dir),
                mode=mode,
                settings=wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True),
            )
        except Exception as exc:  # wandb raises many types for network/auth failures
            raise DvtrainError(
                f"W&B could not start in {mode} mode ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "use logging.wandb=offline and `wandb sync` later"
            ) from None

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        """Finish and flush: `finish` alone can return before the run file is written; `teardown` waits."""
        if self.run is None:
            return
        import wandb

        self.run.finish(exit_code=exit_code)
        wandb.teardown()
        self.run = None


def read_offline_run(path: Path) -> list[dict]:
    """The records of an offline W&B run (a run directory or its .wandb file), oldest first.

    wandb ships no Python reader for its transaction log; its own `wandb leet inspect --json`
    prints one JSON record per line."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(path)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise DvtrainError(f"cannot read the W&B run at {path} ({done.stderr.strip()[:200]}); pass an offline-run-* directory")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


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
            disable=None if enabled else True,
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
