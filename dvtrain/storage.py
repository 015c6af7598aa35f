"""Where dvtrain writes: checking that it can before any work, and replacing only what it wrote.

`check_writable` probes a folder by creating (and removing) a file in it, or in the nearest existing folder
above it: the only test that also holds for root, read-only mounts and immutable folders, which permission
bits do not show. `check_own_run` recognises a run directory that `dvtrain train` wrote, and `clear_run`
(`--overwrite`) removes only the entries dvtrain writes there, never a folder it does not know.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from dvtrain import rundir
from dvtrain import stages as stage_registry
from dvtrain.config import RENAMED_SECTIONS, Config, read_yaml
from dvtrain.errors import DvtrainError

CONFIG_FILE = rundir.CONFIG
# dvtrain before the shared transfer cache (dvtrain.eval.surrogates) kept the surrogates in RUN_DIR/surrogates/.
OLD_SURROGATES = "surrogates"
# What dvtrain writes in a run directory (train: config, checkpoints, results, W&B; eval: plots; earlier
# releases: surrogates), with the `.tmp` files of its whole-then-rename writes and the `.tmp`/`.old`/`.trash-*`
# checkpoint folders.
RUN_ENTRIES = (rundir.CONFIG, rundir.CHECKPOINTS, rundir.RESULTS_JSON, rundir.RESULTS_MD, rundir.WANDB, rundir.PLOTS,
               OLD_SURROGATES)
RUN_ENTRY_SUFFIXES = ("", ".tmp", ".old", ".part")
TRASH = ".trash-"


class StorageError(DvtrainError):
    pass


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Raise StorageError unless a file can be created in `folder` (or, when it does not exist yet, the folder
    can be created under its nearest existing parent). Leaves nothing behind."""
    folder = Path(folder)
    target = folder
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if target.exists() and not target.is_dir():
        raise StorageError(f"{what} {folder} cannot be written: {target} is a file, not a folder; {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".dvtrain-probe-"):
            pass
    except OSError as exc:
        raise StorageError(f"{what} {folder} cannot be written ({exc.strerror or exc}); {fix}") from None


def owned_entry(name: str) -> bool:
    """An entry of a run directory that dvtrain writes (see RUN_ENTRIES)."""
    return any(name == entry + suffix for entry in RUN_ENTRIES for suffix in RUN_ENTRY_SUFFIXES) or (
        TRASH in name and name.split(TRASH)[0] in RUN_ENTRIES)


def _dvtrain_config(path: Path) -> bool:
    """A YAML mapping of dvtrain's config sections (any dvtrain version: keys only, values not validated)."""
    try:
        tree = read_yaml(path)
    except (DvtrainError, yaml.YAMLError):
        return False
    known = set(Config.__dataclass_fields__) - {"sections"} | set(stage_registry.names()) | set(RENAMED_SECTIONS)
    return bool(tree) and "stages" in tree and set(tree) <= known


def check_own_run(run_dir: Path) -> list[str]:
    """Refuse (StorageError) to overwrite a folder that is not a dvtrain run: it must hold a config.yaml of
    dvtrain's sections, and its checkpoints/ (if any) only stage folders. An empty folder is fine. Returns the
    names of entries dvtrain did not write, which `clear_run` keeps."""
    run_dir = Path(run_dir)
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not entries:
        return []
    fix = "pass the run directory itself, or move your files away first (nothing was deleted)"
    if not _dvtrain_config(run_dir / CONFIG_FILE):
        raise StorageError(f"--overwrite refuses {run_dir}: it is not a dvtrain run directory (no {CONFIG_FILE} of "
                           f"dvtrain's, {len(entries)} entries such as {entries[0]}); {fix}")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() or checkpoints.is_symlink():
        if checkpoints.is_symlink() or not checkpoints.is_dir():
            raise StorageError(f"--overwrite refuses {run_dir}: its checkpoints is not a folder dvtrain wrote; {fix}")
        foreign = [p.name for p in checkpoints.iterdir()
                   if p.name.split(".")[0] not in stage_registry.names() + ("surrogates",)]
        if foreign:
            raise StorageError(f"--overwrite refuses {run_dir}: checkpoints/ holds {foreign[0]}, which is not a "
                               f"stage's checkpoint; {fix}")
    return [name for name in entries if not owned_entry(name)]


def clear_run(run_dir: Path) -> list[str]:
    """`--overwrite`: remove what dvtrain wrote in a run directory `check_own_run` accepted; other entries
    stay. A symbolic link is removed as a link, never followed. Returns the names kept."""
    run_dir = Path(run_dir)
    kept = check_own_run(run_dir)
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if not owned_entry(entry.name):
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
    return kept


def wandb_dirs(run_dir: Path, artifacts: bool) -> list[tuple[Path, str]]:
    """The folders a W&B run of dvtrain writes to: RUN_DIR/wandb always (dvtrain passes it as the run's
    `dir`, which WANDB_DIR cannot move), and with artifacts the staging and cache folders, which the
    environment may move (WANDB_DATA_DIR, WANDB_CACHE_DIR; dvtrain's default: RUN_DIR/wandb/.local)."""
    found = [(Path(run_dir) / "wandb", "W&B folder")]
    if artifacts:
        for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
            if os.environ.get(var):
                found.append((Path(os.environ[var]), f"W&B folder ({var})"))
    return found
