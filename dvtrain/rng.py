"""Named random streams derived from the run seed.

Every source of randomness has its own `torch.Generator`, keyed by the run seed and a name such as
("init", 2) or ("data", "dverge"). A submodel's stream therefore does not depend on which process
owns it or on how many others exist, and every stream's state can be checkpointed. Generators live on
the CPU so the same seed gives the same numbers on every device.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # fits a signed 64-bit integer


def stream(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
