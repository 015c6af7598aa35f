"""Transfer example sets as an artifact shared between runs: one safetensors file per (data, surrogate
ensemble, attack, loss, ε, seed, budget), beside a JSON manifest that records that protocol.

Content-addressed (issue 26, finding 2): the manifest holds everything that determines the bytes: the
digest of the images and labels actually attacked (not a config field naming where they were read from),
the surrogate ensemble's identity (itself keyed by the digest of the data it was trained on), the attack
and every setting that feeds it (batch size included: M-DI²-FGSM's and the random starts' draws follow the
batches) and FORMAT, the code version. Every read is verified (shape, dtype and the SHA-256 of the bytes,
recorded in the manifest): a damaged file is said in one line and crafted again.

Why: every stage and every run on the same data (vanilla, DVERGE, +AdvT, the baselines) must be scored
on identical adversarial examples, as the DVERGE authors did by publishing theirs. The file name ends in
a hash of the manifest, so a changed protocol is a new file (generated), and a matching one is read back
(never regenerated). Images are stored as float32, exactly the tensors the attack produced (no uint8
rounding: an 8-bit copy would move every pixel by up to 1/510 and could leave the ε-ball).

Writes are atomic (a temporary file renamed into place, the manifest last) and happen under a file lock
(`filelock`), so concurrent evaluations on the same cache generate a set once and never read half a file.
A set already there and verified is read without the lock: a user who shares the cache read-only (another
user's umask 022) can read it, and only crafting a missing set needs the lock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file
from torch import Tensor

from dvtrain import storage
from dvtrain.errors import DvtrainError
from dvtrain.paths import PathError, check_readable, unlockable

FORMAT = 2  # the code version: bump when the stored layout or the attacks' code changes what a manifest promises
CHECKSUM = "sha256"  # manifest fields written with the file, not part of its identity
SHAPE, DTYPE = "shape", "dtype"
STORED_FIELDS = (CHECKSUM, SHAPE, DTYPE)
LOCK_FIX = ("ask the cache's owner to make it group-writable (chmod -R g+w, and umask 002 for new files), "
            "or set eval.transfer.cache_dir to a folder of your own")
LOCK_NOTICE_S = 5.0  # a wait on another evaluation's lock longer than this says what it waits for
EXAMPLES = "examples"  # [R, N, C, H, W] float32: R runs (restarts) of N images
HASH_CHARS = 12
# How far beyond ε (and [0, 1]) a stored pixel may lie: float32 rounding of x + δ near 1 (its spacing there is
# 6e-8), with room to spare; a real excess is orders larger (a set crafted at another ε: 0.05).
BALL_TOLERANCE = 1e-6


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


def bytes_checksum(examples: Tensor) -> str:
    return hashlib.sha256(examples.contiguous().numpy().tobytes()).hexdigest()


@contextmanager
def holding(lock_path: Path, what: str) -> Iterator[None]:
    """Hold the file lock `lock_path`; after LOCK_NOTICE_S seconds of waiting, one line says what for.
    Raises PathError (one line: owner, mode, LOCK_FIX) when this user may not open the lock for writing."""
    lock = FileLock(str(lock_path))
    try:
        try:
            lock.acquire(timeout=LOCK_NOTICE_S)
        except Timeout:
            print(f"[eval] waiting for {lock_path}: held by another evaluation ({what})", flush=True)
            lock.acquire()
    except PermissionError:
        raise PathError(unlockable(lock_path, what, LOCK_FIX)) from None
    try:
        yield
    finally:
        lock.release()


def _stored_manifest(folder: Path, manifest: dict, say: bool = False) -> dict | None:
    """The manifest on disk for `manifest` (FORMAT added), if its identity matches (`say`: one line when the
    manifest is there but not JSON, since the set is then crafted again)."""
    manifest = {"format": FORMAT, **manifest}
    path = set_path(folder, manifest)
    manifest_path = path.with_suffix(".json")
    if not (manifest_path.is_file() and path.is_file()):
        return None
    check_readable(manifest_path, "transfer cache manifest")  # another user's file: named, not re-crafted
    try:
        stored = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        if say:
            print(f"[eval] example set manifest {manifest_path} is damaged ({type(exc).__name__}): crafting it again",
                  flush=True)
        return None
    identity = {k: v for k, v in stored.items() if k not in STORED_FIELDS} if isinstance(stored, dict) else None
    return stored if identity == manifest else None


def is_stored(folder: Path, manifest: dict) -> bool:
    """Whether the set `manifest` describes is in `folder` (so `load_or_generate` would only read it, unless
    its bytes turn out damaged)."""
    return _stored_manifest(folder, manifest) is not None


def outside_ball(examples: Tensor, clean: Tensor | None, eps: float) -> str | None:
    """What is wrong when examples [R, N, C, H, W] are not adversarial examples of `clean` [N, C, H, W] at L∞
    radius `eps` (pixels in [0, 1]): a pixel beyond the ε-ball or outside [0, 1] (BALL_TOLERANCE allowed
    for float32 rounding); None when they are, or when `clean` is None (nothing to compare with)."""
    if clean is None:
        return None
    if examples.shape[1:] != clean.shape:
        return f"shape {list(examples.shape)} for {len(clean)} images of shape {list(clean.shape[1:])}"
    distance = float((examples - clean.to(examples.device, examples.dtype)).abs().amax()) if examples.numel() else 0.0
    if distance > eps + BALL_TOLERANCE:
        return f"a pixel moved {distance:.4g} from its image, beyond ε={eps:g}"
    if examples.numel() and not (float(examples.amin()) >= -BALL_TOLERANCE and float(examples.amax()) <= 1 + BALL_TOLERANCE):
        return "pixels outside [0, 1]"
    return None


def verified(path: Path, stored: dict, say: bool = True, clean: Tensor | None = None) -> Tensor | None:
    """The examples in `path` if they are what `stored` (the manifest on disk) records: shape, dtype and
    checksum, and (given the attacked images `clean`) within the manifest's ε-ball (`outside_ball`); None
    when damaged or unreadable (`say`: with one line naming the file)."""
    check_readable(path, "transfer cache file")  # (safetensors reports an unreadable file as missing)
    try:
        examples = load_file(str(path))[EXAMPLES]
    except Exception as exc:  # safetensors raises its own errors for truncated or foreign files
        problem = f"unreadable ({type(exc).__name__})"
    else:
        if CHECKSUM not in stored:
            problem = "written without a checksum"
        elif list(examples.shape) != stored.get(SHAPE) or str(examples.dtype) != stored.get(DTYPE):
            problem = f"shape {list(examples.shape)} {examples.dtype}, manifest {stored.get(SHAPE)} {stored.get(DTYPE)}"
        elif bytes_checksum(examples) != stored[CHECKSUM]:
            problem = "checksum does not match its manifest"
        else:
            problem = outside_ball(examples, clean, stored["eps"])
            if problem is None:
                return examples
    if say:
        print(f"[eval] example set {path} is damaged ({problem}): crafting it again", flush=True)
    return None


def load_or_generate(folder: Path, manifest: dict, generate: Callable[[], Tensor], clean: Tensor | None = None) -> Tensor:
    """The example set `manifest` describes: read from `folder` when a file with that exact manifest is
    there and its bytes are verified, else `generate()` ([R, N, C, H, W] float32) is called once, stored
    (with its shape, dtype and checksum in the manifest) and returned (on the CPU). Given the attacked
    images `clean` [N, C, H, W], a stored set must lie in their ε-ball (else it is crafted again), and so
    must a generated one.

    `manifest` must be JSON-able and hold at least "attack", "loss" and "eps"; FORMAT is added to it.
    Raises OSError when the folder cannot be written, DvtrainError when `generate` crafts examples outside
    the ε-ball (an attack's bug: nothing is stored)."""
    raw = manifest
    manifest = {"format": FORMAT, **manifest}
    path = set_path(folder, manifest)
    manifest_path = path.with_suffix(".json")
    stored = _stored_manifest(folder, raw)
    examples = None if stored is None else verified(path, stored, say=False, clean=clean)
    if examples is not None:
        return examples  # (no lock: files are renamed into place whole, and the bytes were just verified)
    path.parent.mkdir(parents=True, exist_ok=True)
    with holding(path.with_suffix(".lock"), f"crafting {path.name}"):
        stored = _stored_manifest(folder, raw, say=True)
        if stored is not None:
            examples = verified(path, stored, clean=clean)
            if examples is not None:
                return examples
        examples = generate().detach().to("cpu", torch.float32).contiguous()
        problem = outside_ball(examples, clean, manifest["eps"])
        if problem is not None:
            raise DvtrainError(f"transfer attack {manifest['attack']!r} crafted examples that are not within its "
                               f"ε-ball ({problem}); nothing was stored: fix the attack's craft function")
        record = manifest | {CHECKSUM: bytes_checksum(examples), SHAPE: list(examples.shape), DTYPE: str(examples.dtype)}
        manifest_path.unlink(missing_ok=True)  # the manifest last: a crash between the two leaves no stale pair
        _write_atomic(path, lambda tmp: save_file({EXAMPLES: examples}, str(tmp), metadata={"manifest": json.dumps(manifest)}))
        _write_atomic(manifest_path, lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True)))
        return examples
