"""The stage registry: every training stage by name, built-in or from another package.

A stage is registered as a `StageSpec`: its name (also its YAML section), the dataclass of that
section (a `dvtrain.config.StageConfig`), where its trainer class lives, and whether it distils
(evaluation then computes its vulnerability-diversity matrix with the stage's own distillation
settings). The registry is core: configuration, evaluation and reporting read it without importing
any training code, because a trainer is named by "module:Class" and imported only by the stage loop.

Stages come from three places, in this order (the registry's order is the training order shown by
`dvtrain compare`): the built-in ones (`dvtrain.config` registers them), every entry point of the group
`dvtrain.stages` of the installed packages (each names a `StageSpec`), and `register(...)` calls.
Entry points are what make a plug-in visible to every process a launcher starts (`torchrun`,
`accelerate launch`, `dvtrain eval`'s workers) without an import in the user's script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from dvtrain.plugins import misnamed, plugin_objects
from typing import Any

from dvtrain.errors import DvtrainError

ENTRY_POINT_GROUP = "dvtrain.stages"


class StageRegistryError(DvtrainError):
    pass


@dataclass(frozen=True)
class StageSpec:
    """One training stage as the rest of dvtrain sees it.

    `trainer`: the stage's class (`dvtrain.train.stage.Stage`), or "module:Class" imported on first use
    (the built-ins, so that importing the registry pulls in no training code). `section`: the section's
    default value (default: `config()`), e.g. DVERGE+AdvT's DVERGE section with `plus_adv` on.
    `distils`: the stage trains with feature distillation; its section then carries the distillation
    fields of `dvtrain.config.DvergeConfig` (eps, step_size, steps, layer, ...).
    """

    name: str
    config: type
    trainer: type | str
    distils: bool = False
    section: Callable[[], Any] | None = None
    source: str = field(default="dvtrain", compare=False)  # who registered it, for error messages

    def default_section(self) -> Any:
        return (self.section or self.config)()

    def trainer_class(self) -> type:
        """The stage's trainer class, imported now if it was named by "module:Class"."""
        if not isinstance(self.trainer, str):
            return self.trainer
        module, _, attr = self.trainer.partition(":")
        return getattr(importlib.import_module(module), attr)


_BUILT_IN: dict[str, StageSpec] = {}
_REGISTERED: dict[str, StageSpec] = {}
_entry_points_loaded = False


def _add(into: dict[str, StageSpec], spec: StageSpec) -> None:
    if not isinstance(spec, StageSpec):
        raise StageRegistryError(f"{spec!r} is not a dvtrain.stages.StageSpec; register a StageSpec(name, config, trainer)")
    if not spec.name.isidentifier():
        raise StageRegistryError(f"stage name {spec.name!r} must be an identifier (it is also its config section)")
    taken = _BUILT_IN.get(spec.name) or _REGISTERED.get(spec.name)
    if taken is not None and taken != spec:
        raise StageRegistryError(f"stage {spec.name!r} is registered twice ({taken.source} and {spec.source}); "
                                 "rename one of them")
    into[spec.name] = spec


def register_built_in(spec: StageSpec) -> None:
    """A stage of dvtrain itself (called by `dvtrain.config`)."""
    _add(_BUILT_IN, spec)


def register(spec: StageSpec) -> StageSpec:
    """Add a stage from outside dvtrain (registering the same spec again is a no-op). Affects
    configurations built afterwards. Processes started by a launcher see it only if they run this call
    too: publish the spec as an entry point of the group `dvtrain.stages` for that.

    Raises:
        StageRegistryError: another stage has that name, or the name is not an identifier.
    """
    _load_entry_points()
    _add(_REGISTERED, spec)
    return spec


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point, spec in plugin_objects(ENTRY_POINT_GROUP, StageRegistryError):
        if not isinstance(spec, StageSpec) or spec.name != point.name:
            raise StageRegistryError(misnamed(point, ENTRY_POINT_GROUP, "StageSpec"))
        _add(_REGISTERED, StageSpec(spec.name, spec.config, spec.trainer, spec.distils, spec.section,
                                    source=f"entry point {point.value}"))


def specs() -> dict[str, StageSpec]:
    """Every registered stage by name, in training order: built-in, then plug-ins."""
    _load_entry_points()
    return {**_BUILT_IN, **_REGISTERED}


def built_in_names() -> tuple[str, ...]:
    """dvtrain's own stages, in training order (loads no plug-in)."""
    return tuple(_BUILT_IN)


def names() -> tuple[str, ...]:
    return tuple(specs())


def spec(name: str) -> StageSpec:
    """Raises StageRegistryError for a name no stage has."""
    found = specs().get(name)
    if found is None:
        raise StageRegistryError(f"no stage is called {name!r}; the stages are {', '.join(specs())} "
                                 f"(a plug-in stage is registered by an entry point of group {ENTRY_POINT_GROUP})")
    return found


def distils(name: str) -> bool:
    """Whether stage `name` trains with feature distillation (False for a name no stage has)."""
    found = specs().get(name)
    return found is not None and found.distils
