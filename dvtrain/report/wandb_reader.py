"""The offline W&B reader: the records of an offline run (its offline-run-* directory or .wandb file) read
back with wandb's own `wandb leet inspect --json`, and what they say about the run. Reporting's, not
training's: `dvtrain compare` and the tests read runs through it; training only writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dvtrain.errors import DvtrainError

WANDB_READ_TIMEOUT_S = 120


def read_offline_run(path: Path) -> list[dict]:
    """The records of an offline W&B run (its offline-run-* directory or its .wandb file), oldest first.

    wandb ships no Python reader for its transaction log; its own `wandb leet inspect --json`
    prints one JSON record per line.

    Raises:
        DvtrainError: wandb cannot read it (not a run, or one still being written)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    try:
        done = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=WANDB_READ_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DvtrainError(f"cannot read the W&B run at {path} ({type(exc).__name__}); pass an offline-run-* directory") from None
    if done.returncode != 0:
        raise DvtrainError(f"cannot read the W&B run at {path} ({done.stderr.strip()[:200]}); pass an offline-run-* directory")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@dataclass
class OfflineRun:
    """What an offline run's records say about it: identity, config and final summary."""

    run_id: str
    name: str
    group: str
    job_type: str
    config: dict
    summary: dict


def offline_run_info(records: list[dict]) -> OfflineRun:
    """Fold the records of `read_offline_run` into the run's identity, config and summary."""
    run = next((r["run"] for r in records if r["type"] == "run"), {})
    config = {k: v for k, v in (run.get("config") or {}).get("update", {}).items() if k != "_wandb"}
    summary: dict = {}
    for record in records:
        if record["type"] == "config":
            config.update({k: v for k, v in record["config"].get("update", {}).items() if k != "_wandb"})
        elif record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    return OfflineRun(run.get("run_id", ""), run.get("display_name", ""), run.get("run_group", ""),
                      run.get("job_type", ""), config, summary)
