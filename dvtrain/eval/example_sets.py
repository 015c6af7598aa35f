"""Transfer example sets as an artifact shared between runs: one safetensors file per (data, surrogate
ensemble, attack, loss, ε, seed, budget), beside a JSON manifest that records that protocol.

Why: every stage and every run on the same data (vanilla, DVERGE, +AdvT, the baselines) must be scored
on identical adversarial examples, as the DVERGE authors did by publishing theirs. The file name ends in
a hash of the manifest, so a changed protocol is a new file (generated), and a matching one is read back
(never regenerated). Images are stored as float32, exactly the tensors the attack produced (no uint8
rounding: an 8-bit copy would move every pixel by up to 1/510 and could leave the ε-ball).

Writes are atomic (a temporary file renamed into place, the manifest last) and happen under a file lock
(`filelock`), so concurrent evaluations on the same cache generate a set once and never read half a file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import Tensor

from dvtrain import storage
from dvtrain.paths import check_readable

FORMAT = 1  # bump when the stored layout or the attacks' code changes what a manifest promises
EXAMPLES = "examples"  # [R, N, C, H, W] float32: R runs (restarts) of N images
HASH_CHARS = 12


def identity_hash(obj: object) -> str:
    """A short stable hash of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:HASH_CHARS]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    with storage.replacing(path, "transfer cache file") as tmp:  # (permissions: the umask's, not safetensors' 0600)
        write(tmp)


def set_path(folder: Path, manifest: dict) -> Path:
    """The set's safetensors file: <attack>_<loss>_eps<ε>_<hash of the manifest>.safetensors in `folder`."""
    stem = f"{manifest['attack']}_{manifest['loss']}_eps{manifest['eps']:g}_{identity_hash(manifest)}"
    return Path(folder) / f"{stem}.safetensors"


def is_stored(folder: Path, manifest: dict) -> bool:
    """Whether the set `manifest` describes is in `folder` (so `load_or_generate` would only read it)."""
    manifest = {"format": FORMAT, **manifest}
    path = set_path(folder, manifest)
    manifest_path = path.with_suffix(".json")
    if not (manifest_path.is_file() and path.is_file()):
        return False
    check_readable(manifest_path, "transfer cache manifest")
    return json.loads(manifest_path.read_text()) == manifest


def load_or_generate(folder: Path, manifest: dict, generate: Callable[[], Tensor]) -> Tensor:
    """The example set `manifest` describes: read from `folder` when a file with that exact manifest is
    there, else `generate()` ([R, N, C, H, W] float32) is called once, stored and returned (on the CPU).

    `manifest` must be JSON-able and hold at least "attack", "loss" and "eps"; FORMAT is added to it.
    Raises OSError when the folder cannot be written."""
    raw = manifest
    manifest = {"format": FORMAT, **manifest}
    path = set_path(folder, manifest)
    manifest_path = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        if is_stored(folder, raw):
            check_readable(path, "transfer cache file")  # (safetensors reports it as missing)
            return load_file(str(path))[EXAMPLES]
        examples = generate().detach().to("cpu", torch.float32).contiguous()
        _write_atomic(path, lambda tmp: save_file({EXAMPLES: examples}, str(tmp), metadata={"manifest": json.dumps(manifest)}))
        _write_atomic(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True)))
        return examples
