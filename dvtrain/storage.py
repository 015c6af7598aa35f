"""Where dvtrain writes: checking that it can before any work, and replacing only what it wrote.

`check_writable` probes a folder by creating (and removing) a file in it, or in the nearest existing folder
above it: the only test that also holds for root, read-only mounts and immutable folders, which permission
bits do not show. `check_own_run` recognises a run directory that `dvtrain train` wrote, and `clear_run`
(`--overwrite`) removes only the entries dvtrain writes there, never a folder it does not know.

Every whole file dvtrain writes (results, configs, caches, checkpoints' files, tables, plots) goes through
`replacing` / `write_atomic`: the file is written under a temporary name beside its real target (a symbolic
link is followed, never replaced), given the permissions the umask asks for (safetensors 0.8 creates every
file 0600 whatever the umask, its issue 782; a group sharing a run or a cache could not read it), and
renamed over the target only once whole; anything that is not a regular file or a new path (a folder, a
FIFO, a device) is refused with one line, and no temporary file is left behind, also when the write fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from dvtrain import rundir
from dvtrain import stages as stage_registry
from dvtrain.config import RENAMED_SECTIONS, Config, read_yaml
from dvtrain.errors import DvtrainError
from dvtrain.paths import DEEPEST_BELOW, PathError, check_length

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
# Temporary files of `replacing`: a short fixed-length name (a target's name near the file system's NAME_MAX
# must not make its temporary one too long), hidden, unique per writer.
TEMP_PREFIX, TEMP_SUFFIX = ".dvtrain-", ".tmp"


class StorageError(DvtrainError):
    pass


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Raise StorageError unless a file can be created in `folder` (or, when it does not exist yet, the folder
    can be created under its nearest existing parent). Leaves nothing behind."""
    folder = Path(folder)
    try:
        check_length(folder, what, fix, below=DEEPEST_BELOW)
    except PathError as exc:
        raise StorageError(str(exc)) from None
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
    """An entry of a run directory that dvtrain writes (see RUN_ENTRIES), or a temporary file of `replacing`."""
    return any(name == entry + suffix for entry in RUN_ENTRIES for suffix in RUN_ENTRY_SUFFIXES) or (
        TRASH in name and name.split(TRASH)[0] in RUN_ENTRIES) or (
        name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX))


# ----------------------------------------------------------------------------- whole-file writes


def current_umask() -> int:
    """This process's umask (read from /proc where it is shown, else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give a new file the permissions the umask asks for (0666 & ~umask), as `open` would have: for files a
    library creates with fixed permissions (safetensors 0.8: 0600, its issue 782)."""
    os.chmod(path, 0o666 & ~current_umask())


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def output_target(path: Path, what: str = "file") -> Path:
    """The file a whole-file write of `path` replaces: `path` with every symbolic link followed (the link
    stays, its target gets the new content). Raises StorageError when that is not a regular file or a new
    path (a folder, a FIFO, a device, a socket, a link loop), so nothing of the kind is ever replaced."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    fix = "pass the path of a regular file (or of a new one)"
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new path (one below a file: `check_writable` names it)
        return real
    except OSError as exc:  # ELOOP: a link loop; ENAMETOOLONG
        raise StorageError(f"{what} {path} cannot be written ({exc.strerror or exc}); {fix}") from None
    for test, kind in _KINDS:
        if test(mode):
            via = f" (a link to {real})" if real != Path(os.path.abspath(path)) else ""
            raise StorageError(f"{what} {path}{via} is {kind}, not a regular file: dvtrain cannot write it (it writes "
                               f"files whole and replaces only regular ones); {fix}")
    return real


@contextlib.contextmanager
def replacing(path: Path, what: str = "file") -> Iterator[Path]:
    """`with replacing(path) as tmp:` write the whole new content to the file `tmp`; at the end of the block
    it gets the permissions of the file it replaces (a new one: 0666 & ~umask), is synced and renamed over
    `output_target(path)`. If the block raises, the target is untouched and `tmp` removed. The temporary
    name is short and unique, in the target's folder (a rename never crosses file systems).
    Raises StorageError (see `output_target`), OSError from the write."""
    target = output_target(path, what)
    tmp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: Path, content: str | bytes, what: str = "file") -> None:
    """Write `content` (text as UTF-8) as the whole file `path`, atomically (see `replacing`)."""
    with replacing(path, what) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)


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
