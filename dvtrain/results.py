"""The results store: a run's results.json, its schema, and the one reader everything goes through.

results.json holds white-box rows under "eval" and, per stage, the sections `dvtrain eval` adds
("transfer", "blackbox", "eps_sweep", "checks", "diversity", "plots"), training's "stages" and
"provenance", and the split digest "data". Every number carries its basis: a white-box row names its
stage, model, table (the command that produced it), attack with its code version ("code"), norm, ε,
budget (every other setting that changes the number), n and the digest of its images ("images"); a
black-box table holds the protocol it was measured with. "schema" is this file's version
(SCHEMA_VERSION); files written before issue 26 have none (version 1) and are read as they are.

`read_results` validates the whole file before anything uses it: a row with "accuracy": "57.1", a
missing accuracy, "blackbox": [] or a NaN is refused with one line naming the entry (ResultsError, a
DvtrainError: exit 2 in every command). results.json and results.md are written as one step
(`write_results`: both to temporary files, then renamed, the JSON last), under the run directory's lock
(`update_results`). This module imports no torch and nothing of evaluation or training: training,
`dvtrain eval`, `dvtrain compare`, W&B logging and the API all read and write through it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from dvtrain import storage
from dvtrain.errors import DvtrainError
from dvtrain.rundir import RunDir

SCHEMA_KEY = "schema"
SCHEMA_VERSION = 2  # 1: before issue 26 (no "schema"; one global "blackbox_surrogate"); 2: bases and this key
ROWS = "eval"
STAGES = "stages"
ROW_KEY = ("table", "stage", "model", "attack", "code", "norm", "eps", "budget")  # one row per key
# Per-stage sections: a mapping stage → entry. The built-in tables' are validated by name; a plug-in table's
# is listed under PLUGIN_SECTIONS when first stored (`add_stage_section`), so it is dropped with its stage.
STAGE_SECTIONS = ("transfer", "blackbox", "eps_sweep", "checks", "diversity", "plots")
PLUGIN_SECTIONS = "plugin_sections"
# Top-level keys that are not per-stage sections (no plug-in table may take these names).
RESERVED = (SCHEMA_KEY, ROWS, STAGES, PLUGIN_SECTIONS, "provenance", "eval_provenance", "data", "run", "blackbox_surrogate")
PERCENT_RANGE = (0.0, 100.0)
FIX = "restore it from a backup, or move it away and evaluate the run again with `dvtrain eval RUN_DIR`"


class ResultsError(DvtrainError):
    """A results.json that is not what dvtrain writes (one line: the file, the entry, the fix)."""


def write_together(files: dict[Path, str]) -> None:
    """Write several files as one step: every one to its temporary file first, then each renamed into
    place in the given order (put the file readers trust last), so a failed write (a full disk) leaves
    every old file whole. Each file is written as `dvtrain.storage.replacing` writes one."""
    with contextlib.ExitStack() as stack:
        # ExitStack renames the last-entered file first: enter them in reverse to rename them in order.
        staged = {path: stack.enter_context(storage.replacing(Path(path))) for path in reversed(list(files))}
        for path, text in files.items():
            staged[path].write_text(text, encoding="utf-8")


def empty_results() -> dict:
    return {SCHEMA_KEY: SCHEMA_VERSION, ROWS: [], STAGES: {}}


def _refuse(source: object, where: str, problem: str) -> ResultsError:
    return ResultsError(f"{source}: {where} {problem}; {FIX}")


def _row_name(k: int, row: dict) -> str:
    who = " ".join(str(row.get(f)) for f in ("stage", "model", "attack", "norm") if row.get(f) is not None)
    return f"eval[{k}] ({who})" if who else f"eval[{k}]"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(value: object, source: object, where: str) -> None:
    """Every number nested in `value` is finite (JSON allows NaN and Infinity; no dvtrain number is either)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _refuse(source, where, f"holds {value}, not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, source, f"{where}.{key}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _check_numbers(item, source, f"{where}[{k}]")


def _check_row(k: int, row: object, source: object) -> None:
    if not isinstance(row, dict):
        raise _refuse(source, f"eval[{k}]", f"is a JSON {type(row).__name__}, not a row object")
    name = _row_name(k, row)
    for field in ("stage", "model", "attack"):
        if not isinstance(row.get(field), str):
            raise _refuse(source, name, f"has no {field} name (got {json.dumps(row.get(field))})")
    if "accuracy" not in row:
        raise _refuse(source, name, "has no accuracy")
    accuracy = row["accuracy"]
    if accuracy is not None and not _is_number(accuracy):
        raise _refuse(source, name, f"has accuracy {json.dumps(accuracy)}, a {type(accuracy).__name__}, not a number (%)")
    if _is_number(accuracy) and not (math.isfinite(accuracy) and PERCENT_RANGE[0] <= accuracy <= PERCENT_RANGE[1]):
        raise _refuse(source, name, f"has accuracy {accuracy}, not a percentage in [0, 100]")
    for field in ("eps", "ci_low", "ci_high", "sd"):
        if field in row and row[field] is not None and not (_is_number(row[field]) and math.isfinite(row[field])):
            raise _refuse(source, name, f"has {field} {json.dumps(row[field])}, not a finite number")
    if "n" in row and row["n"] is not None and not (isinstance(row["n"], int) and not isinstance(row["n"], bool) and row["n"] >= 0):
        raise _refuse(source, name, f"has n {json.dumps(row['n'])}, not a count of images")
    for field in ("budget", "table", "norm", "images", "code"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise _refuse(source, name, f"has {field} {json.dumps(row[field])}, not a string")


def _check_blackbox(stage: str, table: object, source: object) -> None:
    where = f"blackbox.{stage}"
    if not isinstance(table, dict):
        raise _refuse(source, where, f"is a JSON {type(table).__name__}, not a table object")
    models = table.get("models")
    if not isinstance(models, list) or not models:
        raise _refuse(source, where, "has no list of models")
    grids = [("accuracy", None)] + ([("all", "eps")] if "all" in table else [])
    for key, columns in grids:
        rows = table.get(key)
        if not isinstance(rows, list) or len(rows) != len(models) or not all(isinstance(r, list) for r in rows):
            raise _refuse(source, f"{where}.{key}", f"is not a list of {len(models)} rows (one per model)")
        width = len(table.get(columns) or []) if columns else None
        for m, row in enumerate(rows):
            if width is not None and len(row) != width:
                raise _refuse(source, f"{where}.{key}[{m}]", f"has {len(row)} values for {width} ε")
            for j, value in enumerate(row):
                if value is not None and not _is_number(value):
                    raise _refuse(source, f"{where}.{key}[{m}][{j}]", f"is {json.dumps(value)}, not a number (%)")


def validate(results: object, source: object = "results.json") -> dict:
    """`results` if it is a results.json dvtrain can read (any schema up to SCHEMA_VERSION); raises
    ResultsError naming the first entry that is not (the file `source`, the entry, what is wrong)."""
    if not isinstance(results, dict):
        raise ResultsError(f"{source} holds a JSON {type(results).__name__}, not the object dvtrain writes; {FIX}")
    version = results.get(SCHEMA_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _refuse(source, SCHEMA_KEY, f"is {json.dumps(version)}, not a schema version")
    if version > SCHEMA_VERSION:
        raise ResultsError(f"{source} is of results schema {version}, newer than this dvtrain reads ({SCHEMA_VERSION}); "
                           "upgrade dvtrain to read it")
    rows = results.get(ROWS, [])
    if not isinstance(rows, list):
        raise _refuse(source, ROWS, f"is a JSON {type(rows).__name__}, not a list of rows")
    for k, row in enumerate(rows):
        _check_row(k, row, source)
    if not isinstance(results.get(STAGES, {}), dict):
        raise _refuse(source, STAGES, "is not an object of stages")
    plugins = results.get(PLUGIN_SECTIONS, [])
    if not (isinstance(plugins, list) and all(isinstance(name, str) and name not in RESERVED for name in plugins)):
        raise _refuse(source, PLUGIN_SECTIONS, "is not a list of plug-in table names")
    for section in stage_sections(results):
        entries = results.get(section, {})
        if not isinstance(entries, dict):
            raise _refuse(source, section, f"is a JSON {type(entries).__name__}, not an object of stages")
        for stage, entry in entries.items():
            if section == "blackbox":
                _check_blackbox(stage, entry, source)
            elif section == "checks" and not (isinstance(entry, list) and all(isinstance(line, str) for line in entry)):
                raise _refuse(source, f"checks.{stage}", "is not a list of lines")
            elif section != "checks" and not isinstance(entry, dict):
                raise _refuse(source, f"{section}.{stage}", f"is a JSON {type(entry).__name__}, not an object")
    _check_numbers({k: v for k, v in results.items() if k != ROWS}, source, "")
    return results


def stage_sections(results: dict) -> tuple[str, ...]:
    """Every per-stage section of `results`: the built-in tables' and the plug-in tables' it lists."""
    return STAGE_SECTIONS + tuple(results.get(PLUGIN_SECTIONS, []))


def add_stage_section(results: dict, name: str) -> None:
    """Record in `results` (in place) that `name` is a per-stage section (a plug-in table's results), so
    that retraining a stage drops its entry as it drops the built-in ones'. Nothing for a built-in name."""
    if name not in STAGE_SECTIONS and name not in RESERVED and name not in results.get(PLUGIN_SECTIONS, []):
        results.setdefault(PLUGIN_SECTIONS, []).append(name)


def read_results(path: Path) -> dict:
    """The validated results.json at `path` (`validate`), with "eval" and "stages" present. Raises
    ResultsError for a file that is not JSON or not dvtrain's, OSError as reading does."""
    text = Path(path).read_text()
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {FIX}") from None
    validate(results, path)
    results.setdefault(ROWS, [])
    results.setdefault(STAGES, {})
    return results


def load_results(run_dir: Path) -> dict:
    """The run's results (`read_results`), or an empty store when it has none yet."""
    path = RunDir(run_dir).results_json
    return read_results(path) if path.is_file() else empty_results()


def write_results(run_dir: Path, results: dict, markdown: str) -> None:
    """results.json (at SCHEMA_VERSION, validated first) and results.md as one step (`write_together`).
    Call it on the main process holding `RunDir.lock()`; `update_results` does both."""
    run = RunDir(run_dir)
    results[SCHEMA_KEY] = SCHEMA_VERSION
    validate(results, run.results_json)
    write_together({run.results_md: markdown, run.results_json: json.dumps(results, indent=1)})


def update_results(run_dir: Path, change: Callable[[dict], None], render: Callable[[dict], str]) -> dict:
    """Read the store, apply `change(results)` in place, write results.json and `render(results)` as
    results.md; all under the run directory's inter-process lock, so concurrent writers never lose each
    other's entries. Returns the results as written."""
    with RunDir(run_dir).lock():
        results = load_results(run_dir)
        change(results)
        write_results(run_dir, results, render(results))
    return results


def row_key(row: dict) -> tuple:
    """A white-box row's identity (`ROW_KEY`); fields rows of older releases lack are None, so a row of
    another attack code version never replaces, nor is merged with, an older one."""
    return tuple(row.get(field) for field in ROW_KEY)


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """`existing` with every row whose key a `new` row has replaced by it, the new rows last (newest).
    A row of a release before code versions (no "code") is replaced by a new row equal in every other key
    field: version 1 of every attack is the code those releases ran; a row of another recorded version
    is kept beside the new one."""
    replaced = {row_key(r) for r in new}
    legacy = {_key_without_code(r) for r in new}
    return [r for r in existing
            if row_key(r) not in replaced and not (r.get("code") is None and _key_without_code(r) in legacy)] + list(new)


def _key_without_code(row: dict) -> tuple:
    return tuple(row.get(field) for field in ROW_KEY if field != "code")


def forget_stage(stored: dict, stage: str) -> None:
    """Drop (in place) every number of `stage` from results.json `stored`, because the stage has new weights:
    its white-box rows, its entry of every per-stage section (built-in, plug-in tables' as listed, "plots"),
    and every other stage's link to a figure that also showed this stage (the black-box and worst-case
    figures draw several stages: they are stale until the next `dvtrain eval` draws them again). The figure
    files stay where they are; results.md links only the figures results.json names."""
    stored[ROWS] = [r for r in stored[ROWS] if r["stage"] != stage]
    plots = stored.get("plots", {})
    stale = set(plots.get(stage, {}).values())
    for section in stage_sections(stored):
        stored.get(section, {}).pop(stage, None)
    for kinds in plots.values():
        for kind in [k for k, path in kinds.items() if path in stale]:
            del kinds[kind]


def record_table(run_dir: Path, stage: str, rows: list[dict], table: str, command: str, stage_info: dict | None,
                 provenance: dict | None, render: Callable[[dict], str], drop_stage: bool = True) -> dict:
    """Record one white-box table of `stage` (rows as `dvtrain.eval.whitebox.evaluate_stage` returns them)
    under `table` ("train" for the table after each training stage) and `command`; `drop_stage`: the
    stage's weights are new, so every earlier number of it (rows of either table, per-stage sections) is
    dropped; `stage_info` goes to "stages"[stage], `provenance` to "provenance". Returns the store as written."""
    tagged = [r | {"table": table, "command": command} for r in rows]

    def change(stored: dict) -> None:
        if drop_stage:
            forget_stage(stored, stage)
        stored[ROWS] = merge_rows(stored[ROWS], tagged)
        if stage_info is not None:
            stored[STAGES][stage] = stage_info
        if provenance is not None:
            stored["provenance"] = provenance

    return update_results(run_dir, change, render)
