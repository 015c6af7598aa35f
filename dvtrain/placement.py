"""Placement: which process owns which submodel, and how per-submodel tensors reach everyone.

This is the one interface between the DVERGE algorithm and the hardware. The algorithm asks only for
the submodels it owns and for `all_gather`, which turns a tensor stacked over the owned submodels
into one stacked over all of them. Distilled batches enter the other submodels' losses as data, so
the gather carries no gradient, by design.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Placement(Protocol):
    size: int  # number of submodels in the ensemble
    owned: list[int]  # the submodels this process trains, ascending
    is_main: bool  # the process that logs and writes shared files

    def all_gather(self, owned_values: Tensor) -> Tensor:
        """[len(owned), ...] on each process → [size, ...] on every process, in submodel order."""
        ...

    def barrier(self) -> None: ...


class LocalPlacement:
    """One process owns every submodel: gathering is the identity."""

    def __init__(self, size: int):
        self.size = size
        self.owned = list(range(size))
        self.is_main = True

    def all_gather(self, owned_values: Tensor) -> Tensor:
        return owned_values

    def barrier(self) -> None:
        pass
