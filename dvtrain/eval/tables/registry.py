"""The table registry: every table of `dvtrain eval` by name, built-in or from another package.

Tables come from three places, in this order (the order they run, assemble and appear in results.md):
the built-in ones (named here by "module:attribute", imported on first use so that reading results
imports no attack code), every entry point of the group `dvtrain.tables` of the installed packages (each
names a `Table` instance), and `register(...)` calls. Entry points are what make a plug-in table visible
to every process a launcher starts and to `dvtrain compare`, without an import in the user's script.
"""

from __future__ import annotations

import importlib

from dvtrain import stages as stage_registry
from dvtrain.errors import DvtrainError
from dvtrain.eval.tables.contract import Table
from dvtrain.plugins import TABLES_GROUP, misnamed, plugin_objects
from dvtrain.results import RESERVED, STAGE_SECTIONS

ENTRY_POINT_GROUP = TABLES_GROUP
REGISTER_CALL = "register()"
# dvtrain's own tables in the order they run: each after the tables it reads.
BUILT_IN = ("dvtrain.eval.tables.whitebox:TABLE", "dvtrain.eval.tables.transfer:TABLE",
            "dvtrain.eval.tables.blackbox:TABLE", "dvtrain.eval.tables.sweep:TABLE",
            "dvtrain.eval.tables.diversity:TABLE", "dvtrain.eval.tables.checks:TABLE")


class TableRegistryError(DvtrainError):
    pass


_TABLES: dict[str, Table] = {}
_loaded = False


def _load(target: str) -> object:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _add(table: object, source: str) -> None:
    if not isinstance(table, Table):
        raise TableRegistryError(f"{table!r} ({source}) is not a dvtrain.eval.tables.contract.Table; register an "
                                 "instance of a Table subclass")
    if not table.name.isidentifier():
        raise TableRegistryError(f"table name {table.name!r} ({source}) must be an identifier (it is its results.json section)")
    if source not in BUILT_IN and (table.name in RESERVED or table.name in STAGE_SECTIONS):
        raise TableRegistryError(f"table name {table.name!r} ({source}) is a key results.json already uses; rename the table")
    if source not in BUILT_IN and table.name in stage_registry.names():  # its section would read as a stage's
        raise TableRegistryError(f"table name {table.name!r} ({source}) is the name of a stage; rename the table")
    taken = _TABLES.get(table.name)
    if taken is not None and taken is not table:
        raise TableRegistryError(f"table {table.name!r} is registered twice ({source}); rename one of them")
    if table.settings is not None and source == REGISTER_CALL:  # the configuration reads settings from entry points
        raise TableRegistryError(f"table {table.name!r} declares settings but is registered by register(); publish it "
                                 f"as an entry point of group {ENTRY_POINT_GROUP} so that eval.tables.{table.name} exists")
    missing = [name for name in table.reads if name not in _TABLES]
    if missing:
        raise TableRegistryError(f"table {table.name!r} ({source}) reads {', '.join(missing)}, which no table registered "
                                 f"before it writes; the tables are {', '.join(_TABLES)}")
    _TABLES[table.name] = table


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for target in BUILT_IN:
        _add(_load(target), target)
    for point, table in plugin_objects(ENTRY_POINT_GROUP, TableRegistryError):
        if not isinstance(table, Table) or table.name != point.name:
            raise TableRegistryError(misnamed(point, ENTRY_POINT_GROUP, "Table"))
        _add(table, f"entry point {point.value}")


def register(table: Table) -> Table:
    """Add a table from outside dvtrain (registering the same one again is a no-op); it runs after the
    tables registered before it. Processes started by a launcher see it only if they run this call too:
    publish it as an entry point of the group `dvtrain.tables` for that.

    Raises:
        TableRegistryError: another table has that name, the name is not an identifier, or it reads a
        section no earlier table writes.
    """
    _load_all()
    _add(table, REGISTER_CALL)
    return table


def tables() -> list[Table]:
    """Every registered table, in the order they run."""
    _load_all()
    return list(_TABLES.values())

