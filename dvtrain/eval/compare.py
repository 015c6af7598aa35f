"""`dvtrain compare A B …`: the evaluation numbers of several experiments side by side.

One row per experiment, with all its stages. An argument is a run directory (its results.json and
config.yaml); a folder of offline W&B runs (`RUN_DIR/wandb`, or a run directory without results)
whose runs are gathered by W&B group, one row per group; one offline run (an offline-run-* directory
or its .wandb file, read back with wandb's own `wandb leet inspect`); or an online W&B group or run
`entity/project/GROUP_OR_RUN_ID` (through `wandb.Api`). A stage's training run stores its numbers as
summary keys eval/<attack>/<model> (and eval/<attack>/eps), `dvtrain eval` as
eval/<stage>/<model>/<metric>. Columns: every config key that differs between the experiments, then
(stage, metric, ε) of the mixture, or of every model with --submodels. `--group-by seed` gathers the
experiments that differ only in the seed into one row of mean ± s.d. Accuracies are in percent;
transfer_offdiag is a success rate (lower is better).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dvtrain import rundir
from dvtrain.config import STAGES, WANDB_MODES, LoggingConfig, read_yaml
from dvtrain.errors import DvtrainError
from dvtrain.eval.report import METRIC_ORDER, RESULTS_JSON, metric_name, result_metrics
from dvtrain.paths import read_json_object
from dvtrain.tracking import OFFLINE_RUN_GLOB, offline_run_info, read_offline_run

CONFIG_YAML = rundir.CONFIG
EXIT_USER_ERROR = 2  # as dvtrain.cli
ONLINE_PATH = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+$")
MIXTURE = "mixture"
EPS = "eps"  # summary key eval/<attack>/eps: the attack's ε
# Config keys that do not change what a run computes, or name it: never columns, never split a group.
NOT_COMPARED = ("name", "runs_dir", "logging.", "provenance.", "_wandb.")
LEGEND = (
    "Accuracy (%) of the mixture (with --submodels, of each model) per stage and attack at ε; bb_*: black-box "
    "transfer from a surrogate ensemble; transfer_offdiag: mean success (%) of one submodel's PGD examples on the "
    "others (lower is better); with --group-by: mean ± s.d. over the n runs of a row."
)

Column = tuple[str, str, str, float | None]  # (stage, model, metric, ε); ε None where it is 0 or not known


@dataclass
class Experiment:
    """One row: an experiment's numbers over all its stages, and its flattened config."""

    label: str  # how the row is named
    source: str  # the argument it was read from
    values: dict[Column, float]
    config: dict[str, object] = field(default_factory=dict)
    from_wandb: bool = False  # a W&B group's runs: pieces of it given separately are one experiment


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested config → dotted keys (lists kept whole). Numbers become floats: W&B stores 2.0 as 2."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _number_as_float(value)
    return out


def _number_as_float(value: object) -> object:
    if isinstance(value, list):
        return [_number_as_float(v) for v in value]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# ----------------------------------------------------------------------------- reading sources


def read_source(arg: str) -> list[Experiment]:
    """Dispatch on what the argument is; a folder of offline runs may hold several experiments."""
    path = Path(arg)
    if path.exists():
        if path.is_dir() and (path / RESULTS_JSON).is_file():
            return [read_run_dir(path)]
        offline = offline_runs(path)
        if offline:
            return read_offline_runs(offline, arg)
        raise DvtrainError(
            f"{arg} is neither a dvtrain run directory (no {RESULTS_JSON}) nor offline W&B runs (no run-*.wandb); "
            "pass RUN_DIR, RUN_DIR/wandb or RUN_DIR/wandb/offline-run-*"
        )
    if ONLINE_PATH.match(arg):
        return [read_online(arg)]
    raise DvtrainError(
        f"{arg} does not exist; pass a run directory, its wandb folder (RUN_DIR/wandb), an offline W&B run "
        "(RUN_DIR/wandb/offline-run-*) or an online W&B group or run as entity/project/GROUP_OR_RUN_ID"
    )


def read_run_dir(path: Path) -> Experiment:
    fix = f"evaluate the run again with `dvtrain eval {path}`"
    results = read_json_object(path / RESULTS_JSON, "results file", fix)
    try:
        eps = {(r["stage"], r["model"], metric_name(r["attack"], r.get("norm"))): r.get("eps")
               for r in results.get("eval", [])}
        values = {(stage, model, metric, eps.get((stage, model, metric)) or None): value
                  for (stage, model, metric), value in result_metrics(results).items()}
    except (KeyError, TypeError, AttributeError, IndexError):
        raise DvtrainError(f"{path / RESULTS_JSON} does not hold dvtrain's results; {fix}") from None
    if not values:
        raise DvtrainError(f"{path} has no evaluation results yet; run `dvtrain eval {path}` first")
    config = flatten(read_yaml(path / CONFIG_YAML)) if (path / CONFIG_YAML).is_file() else {}
    return Experiment(results.get("run", path.name), str(path), values, config)


def offline_runs(path: Path) -> list[Path]:
    """The .wandb logs of one offline run (its directory or the file), or of every run in a folder of
    them (RUN_DIR/wandb, or RUN_DIR itself), oldest first."""
    if path.is_file():
        return [path] if path.suffix == ".wandb" else []
    own = sorted(path.glob("run-*.wandb"))
    if own:
        return own
    for folder in (path, path / "wandb"):
        found = sorted(folder.glob(f"{OFFLINE_RUN_GLOB}/run-*.wandb"))
        if found:
            return found
    return []


def read_offline_runs(files: list[Path], source: str) -> list[Experiment]:
    """One experiment per W&B group; the pieces of a resumed run are read in the order written."""
    runs = []
    for file in files:
        info = offline_run_info(read_offline_run(file))
        runs.append((info.group or info.name, info.name, info.job_type, info.config, info.summary))
    return [experiment_from_wandb(group, [r[1:] for r in runs if r[0] == group], source)
            for group in dict.fromkeys(r[0] for r in runs)]


def _wandb_api():
    import wandb

    return wandb.Api()


def read_online(path: str) -> Experiment:
    """entity/project/X: the runs of group X, else the run with id X."""
    entity_project, _, name = path.rpartition("/")
    try:
        api = _wandb_api()
        runs = list(api.runs(entity_project, filters={"group": name}))
        if not runs:
            runs = [api.run(path)]
        found = [(run.name, run.job_type, dict(run.config), dict(run.summary_metrics)) for run in runs]
    except Exception as exc:  # wandb raises many types for network, auth and lookup failures
        raise DvtrainError(
            f"cannot read the W&B group or run {path} ({type(exc).__name__}); check entity/project/GROUP_OR_RUN_ID "
            "and that `wandb login` or WANDB_API_KEY gives access to it"
        ) from None
    return experiment_from_wandb(name, found, path)


def _stage_of(name: str, job_type: str | None) -> str | None:
    """A training run's stage: its job type, else the suffix of its name "<experiment>-<stage>"."""
    if job_type in STAGES:
        return job_type
    return next((stage for stage in STAGES if name.endswith("-" + stage)), None)


def experiment_from_wandb(label: str, runs: list[tuple[str, str | None, dict, dict]], source: str) -> Experiment:
    """One experiment from its W&B runs (name, job type, config, summary): eval/<attack>/<model> of each
    stage's run, eval/<stage>/<model>/<metric> of `dvtrain eval`'s. Tables and images are skipped."""
    values: dict[Column, float] = {}
    config: dict[str, object] = {}
    for name, job_type, run_config, summary in runs:
        config.update(flatten(run_config))
        stage = _stage_of(name, job_type)
        numbers = {tuple(k.split("/")[1:]): v for k, v in summary.items()
                   if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in numbers.items():
            if len(key) == 3:
                values[(key[0], key[1], key[2], None)] = float(value)
            elif len(key) == 2 and stage is not None and key[1] != EPS:
                values[(stage, key[1], key[0], numbers.get((key[0], EPS)) or None)] = float(value)
    if not values:
        raise DvtrainError(f"the W&B runs of {source} have no evaluation numbers (summary keys eval/...); pass runs "
                           "of `dvtrain train` or `dvtrain eval` that finished")
    return Experiment(label, source, values, config, from_wandb=True)


def merge_wandb_groups(experiments: list[Experiment]) -> list[Experiment]:
    """The runs of one W&B group given as several arguments (e.g. RUN_DIR/wandb/offline-run-*) as one row."""
    merged: dict[str, Experiment] = {}
    out = []
    for e in experiments:
        first = merged.get(e.label) if e.from_wandb else None
        if first is None:
            out.append(e)
            if e.from_wandb:
                merged[e.label] = e
            continue
        first.values.update(e.values)
        first.config.update(e.config)
        if e.source not in first.source.split(" "):
            first.source += " " + e.source
    return out


# ----------------------------------------------------------------------------- the table


def _column_order(column: Column) -> tuple:
    stage, model, metric, eps = column
    stage_rank = STAGES.index(stage) if stage in STAGES else len(STAGES)
    model_rank = (model == MIXTURE, int(model[3:]) if model[3:].isdigit() else 0, model)
    metric_rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return stage_rank, stage, model_rank, metric_rank, metric, eps or 0.0


def column_label(column: Column) -> str:
    stage, model, metric, eps = column
    name = f"{stage} {metric}" if model == MIXTURE else f"{stage} {model} {metric}"
    return f"{name} ε={eps:.4g}" if eps else name


def differing_keys(experiments: list[Experiment], ignore: tuple[str, ...] = ()) -> list[str]:
    """Config keys whose values are not the same in every experiment (a missing key counts as a value)."""
    keys = sorted({k for e in experiments for k in e.config if not k.startswith(NOT_COMPARED + ignore)})
    return [k for k in keys if len({json.dumps(e.config.get(k), sort_keys=True) for e in experiments}) > 1]


@dataclass
class Row:
    label: str
    config: list[str]  # the differing config values, as shown
    cells: list[list[float]]  # per column: the values of the row's runs (one without --group-by)


def table_rows(experiments: list[Experiment], columns: list[Column], keys: list[str], group_by: list[str]) -> list[Row]:
    """One row per experiment; with `group_by`, one per set of experiments whose differing config keys
    agree except those in `group_by` (e.g. the seeds of one setting)."""
    groups: dict[str, list[Experiment]] = {}
    for e in experiments:
        signature = json.dumps([e.config.get(k) for k in keys if k not in group_by], sort_keys=True)
        groups.setdefault(signature if group_by else str(id(e)), []).append(e)
    rows = []
    for members in groups.values():
        shown = [", ".join(dict.fromkeys(_show(m.config.get(k)) for m in members)) for k in keys]
        cells = [[m.values[c] for m in members if c in m.values] for c in columns]
        rows.append(Row(", ".join(m.label for m in members), shown, cells))
    return rows


def _show(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "—" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def cell_text(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def comparison(experiments: list[Experiment], stage: str | None, submodels: bool) -> list[Column]:
    """Columns present in any experiment (of `stage` if given; the mixture's unless `submodels`)."""
    def wanted(column: Column) -> bool:
        return (stage is None or column[0] == stage) and (submodels or column[1] == MIXTURE)

    for e in experiments:
        if not any(wanted(c) for c in e.values):
            raise DvtrainError(f"{e.source} has no numbers for stage {stage}; drop --stage or pass runs that have it")
    return sorted({c for e in experiments for c in e.values if wanted(c)}, key=_column_order)


def unique_labels(experiments: list[Experiment]) -> None:
    """Where two experiments share a name, name them by the arguments they came from."""
    names = [e.label for e in experiments]
    for e in experiments:
        if names.count(e.label) > 1:
            e.label = e.source


def markdown_table(rows: list[Row], keys: list[str], columns: list[Column], grouped: bool) -> str:
    header = ["Run", *keys, *(["n"] if grouped else []), *(column_label(c) for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---" * (1 + len(keys)) + "|---:" * (len(header) - 1 - len(keys)) + "|"]
    for row in rows:
        n = [str(max((len(v) for v in row.cells), default=0))] if grouped else []
        lines.append("| " + " | ".join([row.label, *row.config, *n, *(cell_text(v) for v in row.cells)]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[Row], keys: list[str], columns: list[Column]) -> None:
    """The same numbers at full precision (mean and s.d. columns for rows of several runs); empty cells
    where a row lacks a column."""
    def sd(values: list[float]) -> str:
        return repr(statistics.stdev(values)) if len(values) > 1 else ""

    tmp = path.with_name(path.name + ".tmp")  # renamed into place once whole: never a half-written table
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, "n", *(part for c in columns for part in (column_label(c), column_label(c) + " sd"))])
        for row in rows:
            n = max((len(v) for v in row.cells), default=0)
            writer.writerow([row.label, *row.config, n, *(part for v in row.cells
                                                          for part in ((repr(statistics.mean(v)) if v else ""), sd(v)))])
    tmp.replace(path)


def log_comparison(mode: str, project: str, entity: str | None, wandb_dir: Path, rows: list[Row], keys: list[str],
                   columns: list[Column], sources: list[str], plot: Path) -> None:
    """A new W&B run (job type compare) holding the table (means) as a wandb.Table and the chart as a wandb.Image."""
    from dvtrain.tracking import Tracker

    tracker = Tracker(LoggingConfig(wandb=mode, project=project, entity=entity, progress=False), wandb_dir,
                      "dvtrain", "compare", {"runs": sources}, active=True)
    if tracker.run is None:
        return
    import wandb

    exit_code = 1
    try:
        table = wandb.Table(columns=["run", *keys, *(column_label(c) for c in columns)],
                            data=[[row.label, *row.config, *(statistics.mean(v) if v else None for v in row.cells)]
                                  for row in rows])
        tracker.run.log({"compare/table": table, "compare/chart": wandb.Image(str(plot))})
        exit_code = 0
    finally:
        tracker.finish(exit_code)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvtrain compare", description="Compare the evaluation numbers of runs side by side.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directory, its wandb folder (RUN_DIR/wandb), an offline W&B run "
                             "(RUN_DIR/wandb/offline-run-*) or an online W&B group or run (entity/project/GROUP_OR_RUN_ID)")
    parser.add_argument("--stage", help="only this stage's columns")
    parser.add_argument("--submodels", action="store_true", help="also every submodel's columns")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="config key the runs of one row may differ in, e.g. seed: one row of mean ± s.d. per "
                             "setting of the other keys (repeatable)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV (full precision)")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="also draw the table as a bar chart (PNG)")
    parser.add_argument("--wandb", choices=[m for m in WANDB_MODES if m != "disabled"],
                        help="log the table and chart to a new W&B run (auto: online with a key, else offline)")
    parser.add_argument("--project", default=LoggingConfig.project, help="W&B project for --wandb")
    parser.add_argument("--entity", help="W&B entity for --wandb")
    parser.add_argument("--wandb-dir", type=Path, default=Path("."), help="where --wandb writes its files (DIR/wandb/)")
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        experiments = merge_wandb_groups([e for arg in args.runs for e in read_source(arg)])
        known = {k for e in experiments for k in e.config}
        unknown = [k for k in args.group_by if k not in known]
        if unknown:
            raise DvtrainError(f"--group-by {unknown[0]} is not a config key of these runs; pass a dotted key such as "
                               "seed or dverge.eps")
        columns = comparison(experiments, args.stage, args.submodels)
        unique_labels(experiments)
        keys = differing_keys(experiments)
        rows = table_rows(experiments, columns, keys, args.group_by)
        print(markdown_table(rows, keys, columns, bool(args.group_by)) + "\n" + LEGEND, flush=True)
        if args.csv:
            write_csv(args.csv, rows, keys, columns)
        if args.plot or args.wandb:
            from dvtrain.eval.plots import comparison_plot

            means = [[statistics.mean(v) if v else None for v in row.cells] for row in rows]
            with tempfile.TemporaryDirectory() as tmp:
                plot = comparison_plot([row.label for row in rows], [column_label(c) for c in columns], means,
                                       "dvtrain compare", args.plot or Path(tmp) / "compare.png")
                if args.wandb:
                    log_comparison(args.wandb, args.project, args.entity, args.wandb_dir, rows, keys, columns,
                                   args.runs, plot)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"dvtrain: error: cannot write {exc.filename} ({exc.strerror}); choose a writable path", file=sys.stderr)
        return EXIT_USER_ERROR
