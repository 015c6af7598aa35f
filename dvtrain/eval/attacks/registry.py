"""Every white-box attack of the tables, declared once: its name (config, results.json), norm, loss,
whether it draws random numbers, its table header, and how it runs. `dvtrain.eval.whitebox` (columns,
seeds, budgets, runs), `dvtrain.eval.report` (headers, metric names) and `dvtrain.eval.sweep` read it;
the config's attack lists (eval.attacks, eval.full_attacks, eval.mixture_only, eval.transfer.sweep_attacks)
are checked against it before any work (`check_names`, with the closest name for a typo).

Attacks come from dvtrain (below), from entry points of the group `dvtrain.attacks` of the installed
packages (each names a record: a `WhiteboxAttack`, registered here, or a transfer attack, which
`dvtrain.eval.attacks.transfer` registers from the same group), and from `register(...)` calls.

Runners come in two kinds: `perturb(model, x, y, eps, cfg, generator, submodels, placement)` returns
adversarial images [N, C, H, W] for one batch (repeated over eval.restarts when `restarts`), and
`robust(model, x, y, norm, eps, cfg, seed)` returns the per-image robust mask [N] of a library that
batches and seeds itself (AutoAttack).

The records are plain data and import no torch: results files, `dvtrain.eval.report` and `dvtrain compare`
read the names and headers without loading it. Each runner imports the attack code it calls (torch,
pyautoattack) when it first runs.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from dvtrain.plugins import misnamed, plugin_objects
from typing import TYPE_CHECKING

from dvtrain.config import EvalConfig
from dvtrain.errors import DvtrainError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from dvtrain.distributed.placement import Placement

    Perturb = Callable[[nn.Module, Tensor, Tensor, float, EvalConfig, torch.Generator, list[nn.Module] | None,
                        Placement | None], Tensor]
    Robust = Callable[[nn.Module, Tensor, Tensor, str, float, EvalConfig, int], Tensor]

LINF, L2 = "Linf", "L2"
ENTRY_POINT_GROUP = "dvtrain.attacks"
TRANSFER_KIND = "transfer"  # the `kind` of `dvtrain.eval.attacks.transfer`'s records
AUTOATTACK_STANDARD_RUNS = 4  # APGD-CE, APGD-T, FAB-T, Square (Croce & Hein, ICML 2020)
AUTOATTACK_LIBRARY_ITERATIONS = 100  # pyautoattack's default n_iter
EACH_AUTOATTACK_NORM = "eval.autoattack.norms"  # the attack runs once per norm listed there
# When an attack draws random numbers (and is repeated over eval.seeds).
ALWAYS, WITH_RANDOM_START, NEVER = "always", "eval.random_start", "never"


@dataclass(frozen=True)
class WhiteboxAttack:
    """One white-box attack. norm: LINF, L2, None (clean images) or EACH_AUTOATTACK_NORM; loss: "ce", "cw"
    (CW margin), "dlr" or None; randomised: ALWAYS, WITH_RANDOM_START or NEVER; header: the table's and
    figures' name; restarts: repeated eval.restarts times (an image must withstand every run);
    mixture_only: exists only for an ensemble; exactly one of perturb / robust (none for clean); budget:
    the budget string's attack-specific part (None: images and seeds say it all)."""

    name: str
    norm: str | None
    loss: str | None
    randomised: str
    header: str
    perturb: Perturb | None = None
    robust: Robust | None = None
    restarts: bool = False
    mixture_only: bool = False
    # The ε sweep runs it on the mixture only (it costs tens of PGD runs; the claim is the mixture's).
    sweep_mixture_only: bool = False
    # What besides the threat model, its images and seeds determines its number (results.json's budget).
    budget: Callable[[EvalConfig, str | None], str] | None = None
    # How many of the table's first images it runs on (0: all of them).
    max_images: Callable[[EvalConfig], int] | None = None
    # Roughly how many forward-backward passes it makes per image and model under a config: the cost
    # `dvtrain.eval.share` balances processes by (an estimate; no number depends on it).
    passes: Callable[[EvalConfig], float] = lambda cfg: 1.0
    # The code format version: bump it when a change to the attack's code changes what its number means, so
    # results.json keeps rows of the old and new code apart (the row's "code", part of its key).
    version: int = 1

    def code(self) -> str:
        """The row field "code": name@version."""
        return f"{self.name}@{self.version}"

    def is_randomised(self, cfg: EvalConfig) -> bool:
        """Whether a run draws random numbers under `cfg` (PGD only from a random start)."""
        return self.randomised == ALWAYS or (self.randomised == WITH_RANDOM_START and cfg.random_start)

    def norms(self, cfg: EvalConfig) -> list[str | None]:
        """The norms it runs at: its own, or each of eval.autoattack.norms."""
        return list(cfg.autoattack.norms) if self.norm == EACH_AUTOATTACK_NORM else [self.norm]


def _pgd(norm: str, loss: str) -> Perturb:
    def run(model, x, y, eps, cfg, generator, submodels=None, placement=None):
        from dvtrain.attacks import pgd_l2, pgd_linf

        if norm == LINF:
            return pgd_linf(model, x, y, eps, cfg.step_size, cfg.steps, cfg.random_start, generator, loss)
        return pgd_l2(model, x, y, eps, cfg.l2_step_size, cfg.steps, cfg.random_start, generator, loss)

    return run


def _fgsm(model, x, y, eps, cfg, generator, submodels=None, placement=None) -> Tensor:
    from dvtrain.attacks import fgsm

    return fgsm(model, x, y, eps)


def _adaptive(model, x, y, eps, cfg, generator, submodels=None, placement=None) -> Tensor:
    from dvtrain.eval.attacks.adaptive import adaptive_linf

    return adaptive_linf(submodels, x, y, eps, cfg.adaptive, generator, placement)


def _autoattack(model, x, y, norm, eps, cfg, seed) -> Tensor:
    from dvtrain.eval.attacks.autoattack import autoattack_robust

    return autoattack_robust(model, x, y, norm, eps, cfg.autoattack, seed, cfg.batch_size)


def _pgd_budget(cfg: EvalConfig, norm: str | None) -> str:
    step = cfg.step_size if norm == LINF else cfg.l2_step_size
    return f"steps={cfg.steps},step={step:g},restarts={cfg.restarts},random_start={int(cfg.random_start)}"


def _budget_value(value: float | list[float]) -> str:
    """A budget entry: a number as %g, a list (eval.adaptive.blend_scales) as its numbers joined by +."""
    return "+".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def _adaptive_budget(cfg: EvalConfig, norm: str | None) -> str:
    return ",".join(f"{k}={_budget_value(v)}" for k, v in dataclasses.asdict(cfg.adaptive).items())


def _autoattack_budget(cfg: EvalConfig, norm: str | None) -> str:
    aa = cfg.autoattack
    custom = f"attacks={'+'.join(aa.attacks)}," if aa.version == "custom" else ""
    return f"version={aa.version},{custom}iterations={aa.iterations or 'library'},queries={aa.square_queries or 'library'}"


def _pgd_record(name: str, norm: str, loss: str, header: str) -> WhiteboxAttack:
    return WhiteboxAttack(name, norm, loss, WITH_RANDOM_START, header, perturb=_pgd(norm, loss), restarts=True,
                          budget=_pgd_budget, passes=lambda cfg: cfg.steps * cfg.restarts)


def _autoattack_passes(cfg: EvalConfig) -> float:
    """The library's attacks run one after the other, each about `iterations` steps per image (APGD-T and
    FAB-T once per target class: counted as one, since most images fall to the first attacks)."""
    aa = cfg.autoattack
    runs = len(aa.attacks) if aa.version == "custom" else AUTOATTACK_STANDARD_RUNS
    return (aa.iterations or AUTOATTACK_LIBRARY_ITERATIONS) * runs


def _adaptive_passes(cfg: EvalConfig) -> float:
    a = cfg.adaptive
    return a.steps * (len(a.blend_scales) + a.target_classes) * a.restarts


ATTACKS: dict[str, WhiteboxAttack] = {a.name: a for a in (
    WhiteboxAttack("clean", None, None, NEVER, "Clean"),
    WhiteboxAttack("fgsm", LINF, "ce", NEVER, "FGSM", perturb=_fgsm, passes=lambda cfg: 2.0),  # Goodfellow et al., ICLR 2015
    # PGD (Madry et al., ICLR 2018) with cross-entropy, the CW margin (Carlini & Wagner, S&P 2017) or DLR
    # (Croce & Hein, ICML 2020) loss.
    _pgd_record("pgd_linf", LINF, "ce", "PGD"),
    _pgd_record("pgd_l2", L2, "ce", "PGD"),
    _pgd_record("pgd_linf_margin", LINF, "cw", "PGD margin"),
    _pgd_record("pgd_l2_margin", L2, "cw", "PGD margin"),
    _pgd_record("pgd_linf_dlr", LINF, "dlr", "PGD DLR"),
    _pgd_record("pgd_l2_dlr", L2, "dlr", "PGD DLR"),
    WhiteboxAttack("autoattack", EACH_AUTOATTACK_NORM, None, ALWAYS, "AutoAttack", robust=_autoattack,
                   budget=_autoattack_budget, max_images=lambda cfg: cfg.autoattack.num_examples,
                   passes=_autoattack_passes, sweep_mixture_only=True),
    WhiteboxAttack("adaptive", LINF, "ce", ALWAYS, "Adaptive", perturb=_adaptive, mixture_only=True,  # after MORA
                   sweep_mixture_only=True, budget=_adaptive_budget, passes=_adaptive_passes),
)}


class AttackRegistryError(DvtrainError, ValueError):
    """An unknown attack name, or a record that cannot be registered (one line: what, and the fix)."""


_entry_points_loaded = False


def register(record: WhiteboxAttack) -> WhiteboxAttack:
    """Add a white-box attack from outside dvtrain (the same record again is a no-op). Processes started by
    a launcher see it only if they run this call too: publish it as an entry point of the group
    `dvtrain.attacks` for that. Raises AttackRegistryError for a name another record has, or a record
    that is not a WhiteboxAttack."""
    load_entry_points()
    _add(record, "register()")
    return record


def _add(record: object, source: str) -> None:
    if not isinstance(record, WhiteboxAttack):
        raise AttackRegistryError(f"{record!r} ({source}) is not a dvtrain.eval.attacks.registry.WhiteboxAttack")
    if not record.name.isidentifier():
        raise AttackRegistryError(f"attack name {record.name!r} ({source}) must be an identifier (it names metrics)")
    taken = ATTACKS.get(record.name)
    if taken is not None and taken is not record:
        raise AttackRegistryError(f"attack {record.name!r} is registered twice ({source}); rename one of them")
    if (record.perturb is None) + (record.robust is None) != (2 if record.norm is None else 1):
        raise AttackRegistryError(f"attack {record.name!r} ({source}) needs exactly one of perturb and robust "
                                  "(neither for clean images, norm None)")
    ATTACKS[record.name] = record


def load_entry_points() -> None:
    """Register the white-box records the entry points of group `dvtrain.attacks` name (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point, record in plugin_objects(ENTRY_POINT_GROUP, AttackRegistryError):
        if getattr(record, "name", None) != point.name:
            raise AttackRegistryError(misnamed(point, ENTRY_POINT_GROUP, "attack record"))
        if isinstance(record, WhiteboxAttack):
            _add(record, f"entry point {point.value}")
        elif getattr(record, "kind", None) != TRANSFER_KIND:  # transfer records: dvtrain.eval.attacks.transfer loads them
            raise AttackRegistryError(f"the entry point {point.name} = {point.value} of group {ENTRY_POINT_GROUP} names "
                                      "neither a WhiteboxAttack nor a transfer attack record")


def attacks() -> dict[str, WhiteboxAttack]:
    """Every registered white-box attack by name: dvtrain's, then plug-ins'."""
    load_entry_points()
    return ATTACKS


def attack(name: str, key: str = "attack") -> WhiteboxAttack:
    """The record of `name`. Raises AttackRegistryError (a DvtrainError and a ValueError) naming `key`,
    the closest registered name and every name for an unknown one."""
    found = attacks().get(name)
    if found is None:
        close = difflib.get_close_matches(name, ATTACKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AttackRegistryError(f"{key}: unknown attack {name!r}; choose from {', '.join(ATTACKS)}{hint} "
                                  f"(a plug-in attack is registered by an entry point of group {ENTRY_POINT_GROUP})")
    return found


def check_names(cfg: EvalConfig) -> None:
    """Every attack the config names is registered, and the ε sweep's are L∞ attacks: eval.attacks,
    eval.full_attacks, eval.mixture_only, eval.transfer.sweep_attacks. Raises AttackRegistryError with
    the key, the closest name and the choices; checked before any work."""
    for key, names in (("attacks", cfg.attacks), ("full_attacks", cfg.full_attacks), ("mixture_only", cfg.mixture_only)):
        for name in names:
            attack(name, f"eval.{key}")
    for name in cfg.transfer.sweep_attacks:
        record = attack(name, "eval.transfer.sweep_attacks")
        if record.norm not in (LINF, EACH_AUTOATTACK_NORM):
            l_inf = [n for n, a in ATTACKS.items() if a.norm in (LINF, EACH_AUTOATTACK_NORM)]
            raise AttackRegistryError(f"eval.transfer.sweep_attacks: {name!r} is not an L∞ attack (the sweep is over "
                                      f"L∞ ε); choose from {', '.join(l_inf)}")
