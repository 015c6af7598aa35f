"""`dvtrain compare A B …`: the evaluation numbers of several runs side by side.

Each argument is a run directory (its results.json), a local offline W&B run (an offline-run-*
directory or its .wandb file, read back with wandb's own `wandb leet inspect`), or an online W&B run
path entity/project/run_id (through `wandb.Api`). Every source becomes the same flat map
(stage, model, metric) → number: results.json through `dvtrain.eval.report.result_metrics`, W&B runs
through their summary keys, which dvtrain writes as eval/<model>/<attack> in a stage's training run
(the stage is the run's job type, or its name's suffix) and as eval/<stage>/<model>/<metric> in the
run of `dvtrain eval`. Rows are runs; columns are (stage, metric) of the mixture, or of every model
with --submodels. Accuracies are in percent; transfer_offdiag is a success rate (lower is better).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dvtrain.config import STAGES, LoggingConfig, WANDB_MODES
from dvtrain.errors import DvtrainError
from dvtrain.eval.report import METRIC_ORDER, RESULTS_JSON, result_metrics
from dvtrain.paths import read_json_object

EXIT_USER_ERROR = 2  # as dvtrain.cli
ONLINE_RUN = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+$")
WANDB_READ_TIMEOUT_S = 120
MIXTURE = "mixture"
LEGEND = (
    "Accuracy (%) of the mixture (with --submodels, of each model) per stage and attack; bb_*: black-box transfer "
    "from a surrogate ensemble; transfer_offdiag: mean success (%) of one submodel's PGD examples on the others "
    "(lower is better)."
)

Column = tuple[str, str, str]  # (stage, model, metric)


@dataclass
class RunNumbers:
    label: str  # how the run is named in the table
    source: str  # the argument it was read from
    values: dict[Column, float]


# ----------------------------------------------------------------------------- reading sources


def read_source(arg: str) -> RunNumbers:
    """Dispatch on what the argument is: run directory, offline W&B run, or online run path."""
    path = Path(arg)
    if path.exists():
        if path.is_dir() and (path / RESULTS_JSON).is_file():
            return read_run_dir(path)
        wandb_file = offline_run_file(path)
        if wandb_file is not None:
            return read_offline_run(wandb_file, arg)
        raise DvtrainError(
            f"{arg} is neither a dvtrain run directory (no {RESULTS_JSON}) nor an offline W&B run (no run-*.wandb); "
            "pass RUN_DIR or RUN_DIR/wandb/offline-run-*"
        )
    if ONLINE_RUN.match(arg):
        return read_online_run(arg)
    raise DvtrainError(
        f"{arg} does not exist; pass a run directory, an offline W&B run directory (RUN_DIR/wandb/offline-run-*) "
        "or an online W&B run as entity/project/run_id"
    )


def read_run_dir(path: Path) -> RunNumbers:
    fix = f"evaluate the run again with `dvtrain eval {path}`"
    results = read_json_object(path / RESULTS_JSON, "results file", fix)
    try:
        values = result_metrics(results)
    except (KeyError, TypeError, AttributeError, IndexError):
        raise DvtrainError(f"{path / RESULTS_JSON} does not hold dvtrain's results; {fix}") from None
    if not values:
        raise DvtrainError(f"{path} has no evaluation results yet; run `dvtrain eval {path}` first")
    return RunNumbers(str(results.get("run", path.name)), str(path), values)


def offline_run_file(path: Path) -> Path | None:
    """The .wandb transaction log of an offline run given as its directory or the file itself."""
    if path.is_file() and path.suffix == ".wandb":
        return path
    found = sorted(path.glob("run-*.wandb")) if path.is_dir() else []
    return found[0] if found else None


def _wandb_cli() -> str:
    """The `wandb` command of this environment (next to its Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("wandb")
    return str(beside) if beside.is_file() else (shutil.which("wandb") or "wandb")


def read_offline_run(wandb_file: Path, source: str) -> RunNumbers:
    """Name and summary of an offline run, from wandb's own reader (`wandb leet inspect --summary --json`)."""
    try:
        done = subprocess.run([_wandb_cli(), "leet", "inspect", "--summary", "--json", str(wandb_file)],
                              capture_output=True, text=True, timeout=WANDB_READ_TIMEOUT_S)
        record = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        raise DvtrainError(f"cannot read the offline W&B run {source}; pass an offline-run-* directory written by "
                           "wandb (a run still being written cannot be read: wait for it to finish)")
    return numbers_from_wandb(record.get("name") or wandb_file.stem, None, record.get("summary") or {}, source)


def _wandb_api():
    import wandb

    return wandb.Api()


def read_online_run(path: str) -> RunNumbers:
    try:
        run = _wandb_api().run(path)
        name, job_type, summary = run.name, run.job_type, dict(run.summary_metrics)
    except Exception as exc:  # wandb raises many types for network, auth and lookup failures
        raise DvtrainError(
            f"cannot read the W&B run {path} ({type(exc).__name__}); check entity/project/run_id and that "
            "`wandb login` or WANDB_API_KEY gives access to it"
        ) from None
    return numbers_from_wandb(name or path, job_type, summary, path)


def _stage_of(name: str, job_type: str | None) -> str | None:
    """A training run's stage: its job type, else the suffix of its name "<run>-<stage>"."""
    if job_type in STAGES:
        return job_type
    return next((stage for stage in STAGES if name.endswith("-" + stage)), None)


def numbers_from_wandb(name: str, job_type: str | None, summary: dict, source: str) -> RunNumbers:
    """(stage, model, metric) numbers from summary keys eval/<stage>/<model>/<metric> or, with the
    run's own stage, eval/<model>/<metric>. Tables and images in the summary are skipped."""
    stage = _stage_of(name, job_type)
    values: dict[Column, float] = {}
    for key, value in summary.items():
        parts = key.split("/")
        if parts[0] != "eval" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if len(parts) == 4:
            values[(parts[1], parts[2], parts[3])] = float(value)
        elif len(parts) == 3 and stage is not None:
            values[(stage, parts[1], parts[2])] = float(value)
    if not values:
        raise DvtrainError(f"the W&B run {source} has no evaluation numbers (summary keys eval/...); pass a run "
                           "of `dvtrain train` or `dvtrain eval` that finished")
    return RunNumbers(name, source, values)


# ----------------------------------------------------------------------------- the table


def _column_order(column: Column) -> tuple:
    stage, model, metric = column
    stage_rank = STAGES.index(stage) if stage in STAGES else len(STAGES)
    model_rank = (model == MIXTURE, int(model[3:]) if model[3:].isdigit() else 0, model)
    metric_rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return stage_rank, stage, model_rank, metric_rank, metric


def column_label(column: Column) -> str:
    stage, model, metric = column
    return f"{stage} {metric}" if model == MIXTURE else f"{stage} {model} {metric}"


def comparison(runs: list[RunNumbers], stage: str | None, submodels: bool) -> tuple[list[Column], list[list[float | None]]]:
    """Columns present in any run (of `stage` if given; the mixture's unless `submodels`) and each run's values."""
    def wanted(column: Column) -> bool:
        return (stage is None or column[0] == stage) and (submodels or column[1] == MIXTURE)

    for run in runs:
        if not any(wanted(c) for c in run.values):
            raise DvtrainError(f"{run.source} has no numbers for stage {stage}; drop --stage or pass runs that have it")
    columns = sorted({c for run in runs for c in run.values if wanted(c)}, key=_column_order)
    return columns, [[run.values.get(c) for c in columns] for run in runs]


def unique_labels(runs: list[RunNumbers]) -> list[str]:
    """Run names, or the arguments themselves where two runs share a name."""
    names = [run.label for run in runs]
    return [run.label if names.count(run.label) == 1 else run.source for run in runs]


def markdown_table(labels: list[str], columns: list[Column], values: list[list[float | None]]) -> str:
    lines = ["| Run | " + " | ".join(column_label(c) for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for label, row in zip(labels, values):
        lines.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, labels: list[str], columns: list[Column], values: list[list[float | None]]) -> None:
    """The same numbers at full precision; empty cells where a run lacks a column."""
    tmp = path.with_name(path.name + ".tmp")  # renamed into place once whole: never a half-written table
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *(column_label(c) for c in columns)])
        writer.writerows([label, *("" if v is None else repr(v) for v in row)] for label, row in zip(labels, values))
    tmp.replace(path)


def log_comparison(mode: str, project: str, entity: str | None, wandb_dir: Path, labels: list[str],
                   columns: list[Column], values: list[list[float | None]], sources: list[str], plot: Path) -> None:
    """A new W&B run (job type compare) holding the table as a wandb.Table and the chart as a wandb.Image."""
    from dvtrain.tracking import Tracker

    tracker = Tracker(LoggingConfig(wandb=mode, project=project, entity=entity, progress=False), wandb_dir,
                      "dvtrain", "compare", {"runs": sources}, active=True)
    if tracker.run is None:
        return
    import wandb

    exit_code = 1
    try:
        table = wandb.Table(columns=["run", *(column_label(c) for c in columns)],
                            data=[[label, *row] for label, row in zip(labels, values)])
        tracker.run.log({"compare/table": table, "compare/chart": wandb.Image(str(plot))})
        exit_code = 0
    finally:
        tracker.finish(exit_code)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvtrain compare", description="Compare the evaluation numbers of runs side by side.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directory, offline W&B run (RUN_DIR/wandb/offline-run-*) or entity/project/run_id")
    parser.add_argument("--stage", help="only this stage's columns")
    parser.add_argument("--submodels", action="store_true", help="also every submodel's columns")
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
        runs = [read_source(arg) for arg in args.runs]
        columns, values = comparison(runs, args.stage, args.submodels)
        labels = unique_labels(runs)
        print(markdown_table(labels, columns, values) + "\n" + LEGEND, flush=True)
        if args.csv:
            write_csv(args.csv, labels, columns, values)
        if args.plot or args.wandb:
            from dvtrain.eval.plots import comparison_plot

            with tempfile.TemporaryDirectory() as tmp:
                plot = comparison_plot(labels, [column_label(c) for c in columns], values, "dvtrain compare",
                                       args.plot or Path(tmp) / "compare.png")
                if args.wandb:
                    log_comparison(args.wandb, args.project, args.entity, args.wandb_dir, labels, columns, values,
                                   args.runs, plot)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"dvtrain: error: cannot write {exc.filename} ({exc.strerror}); choose a writable path", file=sys.stderr)
        return EXIT_USER_ERROR
