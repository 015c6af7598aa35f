"""The transfer attacks of the black-box protocol (Yang et al., NeurIPS 2020, §5), one record each:
name, kind, label, the settings that feed its bytes (`budget`, part of each example set's cache key),
its cost, whether it applies to a surrogate architecture, its code version, and how it crafts.

`register(record)` adds one, also from outside the package (a test, a plug-in; an entry point of the group
`dvtrain.attacks` naming a record reaches every process a launcher starts): eval.transfer.blackbox_attacks
names records, and `dvtrain eval` checks every name against TRANSFER_ATTACKS before any work, suggesting
the closest one for a typo. Everything else (the cache key, the cost that balances processes, crafting,
the black-box table, its markdown and compare) comes from the record.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from dvtrain.plugins import plugin_objects

import torch
from torch import Tensor, nn

from dvtrain.config import TransferConfig
from dvtrain.errors import DvtrainError
from dvtrain.eval.attacks import registry as whitebox
from dvtrain.eval.attacks.registry import ENTRY_POINT_GROUP, TRANSFER_KIND
from dvtrain.eval.attacks.mi_fgsm import DiverseInputs, momentum_pgd, residual_branch_ends, skip_gradient

KIND = TRANSFER_KIND


@dataclass(frozen=True)
class TransferAttack:
    """One transfer attack. `budget(tcfg)`: every setting besides ε, loss, seed, images and batch size
    that changes its examples, including "runs" (independent runs, an image must survive all) and
    "steps"; `craft(model, x, y, loss, eps, budget, generator, batch_size)`: one run on images x [N, C, H, W]
    in [0, 1] with labels y [N], batches drawing from `generator` in order → [N, C, H, W];
    `applies(surrogates)`: whether it can run on these surrogate submodels, `not_applicable` the note
    when not ({arch} is filled in); `version`: bump when a code change changes its bytes."""

    name: str
    label: str
    budget: Callable[[TransferConfig], dict]
    craft: Callable[[nn.Module, Tensor, Tensor, str, float, dict, torch.Generator, int], Tensor]
    applies: Callable[[list[nn.Module]], bool] = lambda surrogates: True
    not_applicable: str = ""
    version: int = 1
    kind: str = KIND

    def cost(self, budget: dict) -> float:
        """Forward-backward passes per surrogate submodel and image: runs × steps."""
        return budget["runs"] * budget["steps"]


TRANSFER_ATTACKS: dict[str, TransferAttack] = {}


def register(attack: TransferAttack) -> TransferAttack:
    """Add `attack` to the registry under its name (registering the same record again is a no-op).

    Raises:
        DvtrainError: another transfer record, or a white-box record, has that name. A replaced record
        would craft under the old name, and the shared transfer cache would then hand its example sets to
        every later evaluation as the original attack's.
    """
    taken = TRANSFER_ATTACKS.get(attack.name)
    if taken is not None and taken is not attack:
        raise DvtrainError(f"transfer attack {attack.name!r} is registered twice; rename one of them (a changed "
                           "attack of the same name needs a new name, or a new `version` of its own record)")
    if taken is None and attack.name in whitebox.ATTACKS:
        raise DvtrainError(f"transfer attack {attack.name!r} has the name of a white-box attack; rename it")
    TRANSFER_ATTACKS[attack.name] = attack
    return attack


_entry_points_loaded = False


def load_entry_points() -> None:
    """Register the transfer records the entry points of group `dvtrain.attacks` name (once per process;
    `dvtrain.eval.attacks.registry` registers the white-box ones of the same group)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point, record in plugin_objects(ENTRY_POINT_GROUP, DvtrainError):
        if not isinstance(record, TransferAttack):
            continue
        taken = TRANSFER_ATTACKS.get(record.name)
        if record.name != point.name or (taken is not None and taken is not record) or record.name in whitebox.attacks():
            raise DvtrainError(f"the entry point {point.name} = {point.value} of group {ENTRY_POINT_GROUP} must name a "
                               f"transfer attack called {point.name!r} that no other record, white-box or transfer, has")
        TRANSFER_ATTACKS[record.name] = record


def transfer_attack(name: str, key: str = "eval.transfer.blackbox_attacks") -> TransferAttack:
    """The record of `name` (plug-ins' included: `dvtrain.eval.attacks.registry.load_entry_points`);
    DvtrainError naming `key`, the closest registered name and every name otherwise."""
    load_entry_points()
    if name in TRANSFER_ATTACKS:
        return TRANSFER_ATTACKS[name]
    close = difflib.get_close_matches(name, TRANSFER_ATTACKS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise DvtrainError(f"{key}: unknown transfer attack {name!r}; {hint}choose from {', '.join(TRANSFER_ATTACKS)}")


def batched(attack: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat([attack(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size)])


def _momentum_pgd(model, x, y, loss, eps, budget, generator, batch_size):
    step = budget["step_fraction"] * eps
    return batched(lambda xb, yb: momentum_pgd(model, xb, yb, eps, step, budget["steps"], budget["momentum"],
                                               budget["random_start"], generator, loss), x, y, batch_size)


def _diverse_inputs(model, x, y, loss, eps, budget, generator, batch_size):
    return _momentum_pgd(DiverseInputs(model, budget["di_prob"], budget["di_resize"], generator), x, y, loss, eps, budget,
                         generator, batch_size)


def _skip_gradient(model, x, y, loss, eps, budget, generator, batch_size):
    with skip_gradient(model, budget["gamma"]):
        return _momentum_pgd(model, x, y, loss, eps, budget, generator, batch_size)


MI_PGD = register(TransferAttack(  # random start, steps of step_fraction·ε, restarts (Dong et al., CVPR 2018)
    "mi_pgd", "momentum PGD",
    lambda t: {"steps": t.blackbox_steps, "runs": t.blackbox_restarts, "step_fraction": t.step_fraction,
               "momentum": t.momentum, "random_start": True},
    _momentum_pgd))
M_DI2_FGSM = register(TransferAttack(  # MI-FGSM on diverse inputs, steps of ε/T (Xie et al., CVPR 2019)
    "m_di2_fgsm", "M-DI²-FGSM",
    lambda t: {"steps": t.blackbox_steps, "runs": 1, "step_fraction": 1 / t.blackbox_steps, "momentum": t.momentum,
               "random_start": False, "di_prob": t.di_prob, "di_resize": t.di_resize},
    _diverse_inputs))
SGM = register(TransferAttack(  # MI-FGSM with the residual gradients decayed by γ, steps of ε/T (Wu et al., ICLR 2020)
    "sgm", "SGM",
    lambda t: {"steps": t.blackbox_steps, "runs": 1, "step_fraction": 1 / t.blackbox_steps, "momentum": t.momentum,
               "random_start": False, "gamma": t.sgm_gamma},
    _skip_gradient,
    applies=lambda surrogates: bool(residual_branch_ends(surrogates[0])),
    not_applicable=("SGM does not apply to {arch}: it has no skip connections, so there is no residual gradient to "
                    "decay; its rows are left out (not run)")))
