"""Checkpoints of a stage: safetensors and JSON only, never pickles, and never half-written.

Layout of a stage's folder, `RunDir(run_dir).checkpoints(stage)` (the run directory's layout is dvtrain.rundir's):
    sub<i>.safetensors         weights and buffers of submodel i (what `dvtrain eval` and users load)
    sub<i>.resume.safetensors  its optimizer state and random stream (what `--resume` needs)
    state.json                 epoch reached, completion, layers drawn, shared stream, architecture

A new checkpoint is written into `<stage>.tmp/`; its `state.json` is written last, by an atomic
rename, and marks it whole. It is then swapped in by renames: `<stage>` → `<stage>.old`, `<stage>.tmp` →
`<stage>`. A folder is deleted only by first renaming it to `<stage>.trash-*` (a half-deleted folder is
never mistaken for a checkpoint), and only once a newer whole one is in place. So whatever the moment of
any number of kills, the whole checkpoints on disk are ordered `.tmp` (newest) > `<stage>` > `.old`, and
`latest` finds the newest; the next save first completes a swap a kill cut short (`settle`).
Each process writes the files of the submodels it owns; the main process writes `state.json` and swaps.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dvtrain import storage
from dvtrain.submodels import Owned
from dvtrain.errors import DvtrainError, WriteFailed
from dvtrain.paths import PathError, check_readable, owner, read_json_object
from dvtrain.distributed.placement import Placement

STATE_FILE = "state.json"


class CheckpointError(DvtrainError):
    pass


class CheckpointWriteFailed(CheckpointError, WriteFailed):
    pass


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _trash_glob(path: Path) -> str:
    return path.name + ".trash-*"


def _whole(folder: Path) -> bool:
    """A checkpoint folder whose `state.json`, renamed in after every other file was synced, is there."""
    return (folder / STATE_FILE).is_file()


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (POSIX: a rename is persisted by syncing its directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _discard(folder: Path, path: Path) -> None:
    """Delete a folder of the checkpoint at `path` without ever leaving it half-deleted under a name `latest`
    reads: rename it to a unique trash name first (atomic), then remove that."""
    if not folder.exists():
        return
    trash = path.with_name(_trash_glob(path).replace("*", uuid.uuid4().hex[:8]))
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def settle(path: Path) -> None:
    """Finish what a kill interrupted, so that `path` is the newest whole checkpoint and `.tmp` and `.old`
    are gone: a whole `.tmp` is swapped in (the previous checkpoint kept as `.old` until it is in place), a
    partial `.tmp` and a superseded `.old` are discarded, and trash folders removed. Each step is one rename
    or the deletion of a folder no candidate needs, so a kill inside `settle` is settled the next time."""
    tmp, old = _tmp(path), _old(path)
    if _whole(tmp):
        if path.exists():
            if old.exists():
                _discard(old, path)
            os.replace(path, old)
        os.replace(tmp, path)
    elif tmp.exists():
        _discard(tmp, path)
    if old.exists():
        if _whole(path):
            _discard(old, path)
        elif _whole(old):  # (only if `path` was removed by hand: keep the whole one under the current name)
            if path.exists():
                _discard(path, path)
            os.replace(old, path)
    for trash in path.parent.glob(_trash_glob(path)) if path.parent.is_dir() else []:
        shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(path.parent)


def generator_to_text(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def generator_from_text(text: str) -> torch.Generator:
    g = torch.Generator()
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
    return g


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain values (JSON metadata)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path, owned: Owned, placement: Placement, state: dict, data_states: dict[int, torch.Tensor] | None = None
) -> None:
    """Write the owned submodels (every process) and `state` (main process), then swap atomically.

    `data_states` are the data generators' states at the start of the current epoch (default: their
    current states, right for a checkpoint at an epoch boundary): a resumed run replays the epoch's
    batches from there. A failed write (e.g. a full disk) leaves the previous
    checkpoint in place and raises a `CheckpointError`."""
    if data_states is None:
        data_states = {i: owned.data_generators[i].get_state() for i in owned.ids}
    try:
        _write_and_swap(path, owned, placement, state, data_states)
    except (OSError, SafetensorError) as exc:  # a full disk: OSError(ENOSPC) from Python, SafetensorError from safetensors
        if placement.is_main and not _whole(_tmp(path)):
            shutil.rmtree(_tmp(path), ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointWriteFailed(
            f"could not write checkpoint {path} ({reason}); the previous checkpoint is kept: "
            "free disk space or fix permissions, then run it again"
        ) from None


def _write_and_swap(
    path: Path, owned: Owned, placement: Placement, state: dict, data_states: dict[int, torch.Tensor]
) -> None:
    tmp = _tmp(path)
    if placement.is_main:
        settle(path)  # a whole `.tmp` a kill left is swapped in first, never deleted
        tmp.mkdir(parents=True)
    placement.barrier()
    for i in owned.ids if placement.writes_checkpoint else []:
        weights = {k: v.detach().cpu().contiguous() for k, v in owned.models[i].state_dict().items()}
        save_file(weights, tmp / f"sub{i}.safetensors", metadata={"submodel": str(i)})
        tensors, meta = _optimizer_tensors(owned.optimizers[i])
        tensors["generator"] = owned.generators[i].get_state()
        tensors["data_generator"] = data_states[i]
        save_file(tensors, tmp / f"sub{i}.resume.safetensors", metadata={"optimizer": json.dumps(meta)})
        for name in (f"sub{i}.safetensors", f"sub{i}.resume.safetensors"):
            storage.follow_umask(tmp / name)  # safetensors 0.8 writes 0600 whatever the umask (its issue 782)
            _fsync(tmp / name)
    placement.barrier()
    if placement.is_main:
        part = tmp / (STATE_FILE + ".part")
        part.write_text(json.dumps(state, indent=1))
        _fsync(part)
        os.replace(part, tmp / STATE_FILE)  # from here on `.tmp` is whole: the newest checkpoint
        _fsync_dir(tmp)
        settle(path)
    placement.barrier()


def latest(path: Path) -> Path | None:
    """The newest whole checkpoint of a stage: `.tmp` when a kill cut its swap short, else the current one,
    else the previous one (see the module's docstring); None when there is none. Reads only."""
    for candidate in (_tmp(path), path, _old(path)):
        if _whole(candidate):
            return candidate
    return None


def _start_over(folder: Path) -> str:
    """What to do about a damaged checkpoint: remove it, unless it is another user's (never advise that)."""
    other = owner(folder)
    if other is not None:
        return f"it belongs to {other}: ask them to repair or remove it, or use a run directory of your own"
    return f"remove {folder} to start that stage over"


def read_state(path: Path) -> dict:
    try:
        return read_json_object(path / STATE_FILE, "checkpoint state", _start_over(path))
    except PathError as exc:
        raise CheckpointError(str(exc)) from None


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        check_readable(file, "checkpoint file")
    except PathError as exc:  # safetensors reports a file it may not open as missing
        raise CheckpointError(str(exc)) from None
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated ({exc}); {_start_over(file.parent)}") from None


def check_weights(path: Path, size: int) -> None:
    """Every submodel's weights file of a checkpoint is present and whole (read in full, not kept): lets a
    command refuse a damaged checkpoint before it spends time. Raises CheckpointError."""
    for i in range(size):
        file = path / f"sub{i}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} has no weights for submodel {i}; was it saved with a smaller ensemble.size?")
        _load(file)


def load_weights(path: Path, owned: Owned) -> None:
    for i in owned.ids:
        file = path / f"sub{i}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} has no weights for submodel {i}; was it saved with a smaller ensemble.size?")
        tensors = _load(file)
        try:
            owned.models[i].load_state_dict(tensors)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(
                f"checkpoint {file} does not fit the configured model ({first[1].strip() if len(first) > 1 else first[0]}); "
                "check model.arch and the dataset against the run that saved it"
            ) from None


def load_resume_state(path: Path, owned: Owned) -> None:
    """Optimizer states and random streams of the owned submodels (weights: `load_weights`)."""
    for i in owned.ids:
        file = path / f"sub{i}.resume.safetensors"
        tensors = _load(file)
        with safe_open(file, framework="pt") as f:
            meta = json.loads(f.metadata()["optimizer"])
        missing = sorted({"generator", "data_generator"} - tensors.keys())
        if missing:
            raise CheckpointError(
                f"checkpoint file {file} lacks {', '.join(missing)}: an older dvtrain wrote it and it cannot be "
                f"resumed; {_start_over(path)}, or start a new run directory"
            )
        owned.optimizers[i].load_state_dict(_optimizer_state(tensors, meta))
        owned.generators[i].set_state(tensors["generator"])
        owned.data_generators[i].set_state(tensors["data_generator"])
