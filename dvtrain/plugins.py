"""Plug-ins found through package entry points (stages, evaluation tables, attacks): loading each one with a
one-line error that names the entry point and the fix, in this one place. No torch import here."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points


def plugin_objects(group: str, error: type[Exception]) -> list[tuple[EntryPoint, object]]:
    """(entry point, the object it names) for every entry point of `group`, in the order Python lists them.
    Raises `error` naming the entry point when one cannot be loaded (a broken plug-in names itself instead
    of failing somewhere later)."""
    found = []
    for point in entry_points(group=group):
        try:
            found.append((point, point.load()))
        except Exception as exc:  # noqa: BLE001 - any import failure of a third-party package
            raise error(f"the entry point {point.name} = {point.value} of group {group} cannot be loaded "
                        f"({type(exc).__name__}: {exc}); fix or uninstall that package") from exc
    return found


def misnamed(point: EntryPoint, group: str, kind: str) -> str:
    """The refusal of an entry point that names no `kind` (e.g. "StageSpec") called like the entry point."""
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"the entry point {point.name} = {point.value} of group {group} must name {article} {kind} called {point.name!r}"


# The entry-point group of evaluation tables (`dvtrain.eval.tables.registry` loads the tables from it).
TABLES_GROUP = "dvtrain.tables"
_table_settings: dict[str, type] | None = None


def table_settings(error: type[Exception]) -> dict[str, type]:
    """The settings dataclass of every plug-in table (entry points of TABLES_GROUP) that declares one (its
    `settings` attribute), by table name: `dvtrain.config` builds the section eval.tables.NAME from it, so
    a plug-in table's settings are typed, ranged and overridden like dvtrain's own. Read once per process.
    Raises `error` naming the entry point when one cannot be loaded or its `settings` is not a dataclass."""
    global _table_settings
    if _table_settings is None:
        import dataclasses

        found = {}
        for point, table in plugin_objects(TABLES_GROUP, error):
            settings = getattr(table, "settings", None)
            if settings is None:
                continue
            if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
                raise error(f"the entry point {point.name} = {point.value} of group {TABLES_GROUP} declares settings "
                            f"{settings!r}, which is not a dataclass; declare a @dataclass (fields with `ranged`)")
            found[point.name] = settings
        _table_settings = found
    return _table_settings
