"""Content digests of the data a number rests on: which images and labels, byte for byte.

A digest is a short hex string of SHA-256 over the tensors' bytes (images as float32 in [0, 1], labels as
int64, each with its shape), so two tables or cache entries with equal digests saw the same images and
labels in the same order, whatever path or config field they were read through. Used by the results
store (an entry's basis), by the transfer cache (its content-addressed keys) and by `dvtrain eval` to
verify a run's data against what its training recorded (issue 26, finding 2).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

DIGEST_CHARS = 16


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 (first DIGEST_CHARS hex digits) over the tensors' shapes and bytes in order; images are
    hashed as float32 and integer tensors as int64, on the CPU, so the device does not matter."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu")
        t = t.to(torch.float32 if t.is_floating_point() else torch.int64).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def images_digest(x: Tensor, y: Tensor) -> str:
    """The digest of images x [N, C, H, W] and their labels y [N]."""
    return tensor_digest(x, y)


def split_digest(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> dict[str, str]:
    """{"train": digest, "test": digest}: what a run was trained and evaluated on."""
    return {"train": images_digest(x_train, y_train), "test": images_digest(x_test, y_test)}
