"""How a result was made: code and library versions, hardware, processes, threads, precision, times.

`results.json` carries it under `provenance`, and each stage's W&B run under the config key
`provenance`, so a number can be traced to what produced it. Threads matter: reductions round
differently with another thread count, and DVERGE's sign steps amplify that, so weights are
bit-identical across placements only at equal `threads_per_process`.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

import dvtrain
from dvtrain.config import Config

PACKAGES = ("accelerate", "wandb")  # torch: its own __version__, which names the build (+cpu, +cu130)
GIT_TIMEOUT_S = 10
SOURCE_ROOT = Path(dvtrain.__file__).resolve().parent.parent


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit(root: Path = SOURCE_ROOT) -> str | None:
    """The commit of the source checkout dvtrain runs from, suffixed `-dirty` when files differ from it;
    None when dvtrain is not run from a git checkout (an installed wheel) or git is missing."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def cpu_name() -> str:
    """The CPU model and the widest vector unit torch's kernels use on it, e.g. "AMD EPYC (family 25 model 17),
    AVX512": trained weights depend on both (reductions round differently), so a figure compared with a run on
    another machine names them."""
    model = platform.processor() or platform.machine()
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        model = f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
    except (OSError, KeyError, ValueError):
        pass  # not Linux, or a /proc/cpuinfo without these fields: the platform's own name
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def session(cfg: Config, device: torch.device, world_size: int) -> dict:
    """What this training session runs with, fixed when it starts (`ended` and the stages' wall times
    are added by `record_stage`)."""
    return {
        "dvtrain": dvtrain.__version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        **{name: _package_version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "device": device_name(device),
        "world_size": world_size,
        "threads_per_process": torch.get_num_threads(),
        "precision": cfg.compute.precision,
        "engine": {stage: section.engine for stage, section in cfg.sections.items() if hasattr(section, "engine")},
        "started": now(),
    }


def record_stage(previous: dict | None, current: dict, stage: str, wall_s: float) -> dict:
    """The provenance to store once `stage` trained in the `current` session: the session's fields, its
    end time so far, and each stage's wall time (seconds from its start in the session that finished
    it to its evaluation; earlier sessions' stages keep theirs). In results.json, `stages.<stage>` has
    the training time summed over interrupted sessions (`train_s`) and the evaluation's (`eval_s`)."""
    walls = {**(previous or {}).get("stage_wall_s", {}), stage: round(wall_s, 2)}
    return {**current, "ended": now(), "stage_wall_s": walls}
