"""`dvtrain compare A B …`: the evaluation numbers of several experiments side by side.

An argument is a run directory (its results.json and config.yaml); a folder of offline W&B runs
(`RUN_DIR/wandb`, or a run directory without results) whose runs are gathered by W&B group, one
experiment per group; one offline run (an offline-run-* directory or its .wandb file, read back with
wandb's own `wandb leet inspect`); or an online W&B group or run `entity/project/GROUP_OR_RUN_ID`
(through `wandb.Api`). A stage's training run stores its numbers as summary keys eval/<metric>/<model>
(and eval/<metric>/eps), `dvtrain eval` as eval/<stage>/<model>/<metric> (its ε from its config); both
land in one column per (model, metric, ε), `dvtrain eval`'s number winning where both exist.

The table has one row per (experiment, stage): the config keys the experiments differ in (what they
train: not evaluation settings, eval.*, whose effect each number's basis records), then by
default the headline figures of the mixture (clean, worst case per norm, black-box "all",
transferability), one ε per column, named in the header; `--all` shows every metric at every ε.
`--group-by seed` gathers the experiments that differ only in the seed (and evaluation settings) into
one row of mean ± s.d. with n. A cell marked † rests on another basis than the rest of its column (the attacks a worst case
covers, the attack budget, the number of images): a legend line says which. Accuracies are in
percent; transfer_offdiag is a success rate (lower is better).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dvtrain import rundir, storage
from dvtrain.config import STAGES, WANDB_MODES, LoggingConfig, read_yaml
from dvtrain.errors import DvtrainError
from dvtrain.eval.report import (
    BLACKBOX_PREFIX, METRIC_ORDER, NOT_COMPARABLE, RESULTS_JSON, TRANSFER_OFFDIAG, WORST_CASE, format_eps,
    metric_name, model_label,
)
from dvtrain.eval.headline import table_rank
from dvtrain.eval.tables import registry as tables
from dvtrain.paths import read_json_object
from dvtrain.results import read_results
from dvtrain.report.wandb_reader import offline_run_info, read_offline_run
from dvtrain.tracking import OFFLINE_RUN_GLOB

CONFIG_YAML = rundir.CONFIG
from dvtrain.exits import EXIT_USER_ERROR
ONLINE_PATH = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+$")
MIXTURE = "mixture"
EPS = "eps"  # summary key eval/<attack>/eps: the attack's ε
EPS_INFIX = "_eps"  # <metric>_eps<ε>: a `dvtrain eval` W&B number at the ε it was computed at (report.eval_summary)
# What a W&B number of an earlier dvtrain rests on when its ε was not recorded with it.
EPS_FROM_CONFIG = "ε not recorded with the number (the eval run's config: it may not be the ε computed)"
# Config keys that do not change what a run trains, or name it: never columns, never split a group. Evaluation
# settings (eval.*: the training config's, which `dvtrain eval` may have overridden, and plug-in tables'
# eval.tables.NAME, absent from runs trained without the plug-in) say how a number was measured: each number's
# basis records that, and † keeps numbers on different bases apart.
NOT_COMPARED = ("name", "runs_dir", "logging.", "provenance.", "_wandb.", "eval.")
# The default table's figures, in this order; the worst cases are the report's headline numbers.
HEADLINE = ("clean", metric_name(WORST_CASE, "Linf"), metric_name(WORST_CASE, "L2"), BLACKBOX_PREFIX + "all",
            TRANSFER_OFFDIAG)
SHORT_NAMES = {"clean": "Clean", metric_name(WORST_CASE, "Linf"): "Worst L∞", metric_name(WORST_CASE, "L2"): "Worst L2",
               BLACKBOX_PREFIX + "all": "BB all", TRANSFER_OFFDIAG: "Transfer↓"}
LOWER_IS_BETTER = (TRANSFER_OFFDIAG,)
# L∞ headline figures shown at the worst case's ε where a run has them there (else at their own most common ε).
AT_HEADLINE_EPS = (BLACKBOX_PREFIX + "all", TRANSFER_OFFDIAG)
TERMINAL_WIDTH = 160  # the legend is wrapped to this; the default table of a few runs fits in it
KEY_WIDTH = 16  # dotted config keys longer than this are shown as first.….last where that is unambiguous
PLOT_KIND_SEPARATOR = "_"  # FILE-stem + _ + kind: cmp_accuracy.png, cmp_transfer.png (the W&B key is the kind)
# What a W&B number rests on, where W&B does not say which attacks or images: where it was computed.
TRAINING_TIME, FULL_EVALUATION = "the training-time evaluation", "`dvtrain eval`"
LEGEND = (
    "Accuracy (%) of the mixture (with --submodels, also of each submodel) at the ε in the header (L∞ and black-box: "
    "pixels in [0, 1]; L2: the norm). Worst: images that survive every attack of that norm. BB all: black-box "
    "transfer from the surrogate ensembles, correct under every example set at that ε. Transfer↓: mean success "
    "(%) of one submodel's PGD examples on the others (lower is better)."
)

Column = tuple[str, str, str, float | None]  # (stage, model, metric, ε); ε None where it is 0 or not known
Shown = tuple[str, str, float | None]  # a table column: (model, metric, ε); the stage is the row's


@dataclass
class Experiment:
    """One experiment: its numbers over all its stages, what each rests on, and its flattened config."""

    label: str  # how the row is named
    source: str  # the argument it was read from
    values: dict[Column, float]
    config: dict[str, object] = field(default_factory=dict)
    from_wandb: bool = False  # a W&B group's runs: pieces of it given separately are one experiment
    # What a number rests on (attacks of a worst case, budget, images), as text; absent where unknown.
    basis: dict[Column, str] = field(default_factory=dict)
    trained: bool = True  # False: only `dvtrain eval`'s W&B run, whose config yields to the training runs'


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
        if path.is_file() and path.name == RESULTS_JSON:  # a run's results file stands for its run directory
            return [read_run_dir(path.parent)]
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


def _budget_text(row: dict) -> str:
    """What a white-box row rests on: the attacks of a worst case, its budget (if recorded), its images."""
    parts = []
    if row.get("of"):
        parts.append("worst of " + ", ".join(row["of"]))
    if row.get("budget") not in (None, "", {}):
        budget = row["budget"]
        parts.append(", ".join(f"{k}={v}" for k, v in budget.items()) if isinstance(budget, dict) else str(budget))
    if row.get("n") is not None:
        parts.append(f"n={row['n']}" + (f", images {row['images']}" if row.get("images") else ""))
    return "; ".join(parts)


def results_values(results: dict) -> tuple[dict[Column, float], dict[Column, str]]:
    """Every number of a results.json as (stage, model, metric, ε) → value, and what each rests on.

    White-box rows under `metric_name`; where several rows share a column, the row of the more thorough
    table wins (`dvtrain.eval.headline.table_rank`: `dvtrain eval`'s over the training-time one, as in
    results.md's headline), then, among rows of one table (the same ε evaluated with other budgets), the
    worst case over the most attacks, then the later row. Then every registered
    table's numbers (`dvtrain.eval.tables.contract.Table.numbers`): black-box accuracies as bb_all at each
    ε of the sweep, the mixture's transfer_offdiag (mean off-diagonal transfer success, lower is better) at
    the transfer ε, a plug-in table's own. Rows at different ε stay apart.
    """
    values: dict[Column, float] = {}
    basis: dict[Column, str] = {}
    chosen: dict[Column, tuple[int, int]] = {}  # the kept row's (-table rank, attacks covered): larger wins
    for row in results.get("eval", []):
        if row["accuracy"] is None:  # a row without the key is damaged (KeyError: refused by the caller)
            continue
        column = (row["stage"], row["model"], metric_name(row["attack"], row.get("norm")), row.get("eps") or None)
        preference = (-table_rank(row.get("table")), len(row.get("of") or ()))
        if column not in chosen or preference >= chosen[column]:
            values[column], basis[column], chosen[column] = row["accuracy"], _budget_text(row), preference
    for table in tables.tables():
        for number in table.numbers(results):
            if number.value is not None:
                column = (number.stage, number.model, number.metric, number.eps or None)
                values[column], basis[column] = number.value, number.basis
    return values, {c: b for c, b in basis.items() if b}


def read_run_dir(path: Path) -> Experiment:
    fix = f"evaluate the run again with `dvtrain eval {path}`"
    read_json_object(path / RESULTS_JSON, "results file", fix)  # unreadable or not JSON: said as for every file
    results = read_results(path / RESULTS_JSON)  # the store's one reader: refuses a damaged entry, naming it
    try:
        values, basis = results_values(results)
    except (KeyError, TypeError, AttributeError, IndexError):
        raise DvtrainError(f"{path / RESULTS_JSON} does not hold dvtrain's results; {fix}") from None
    if not values:
        raise DvtrainError(f"{path} has no evaluation results yet; run `dvtrain eval {path}` first")
    config = flatten(read_yaml(path / CONFIG_YAML)) if (path / CONFIG_YAML).is_file() else {}
    return Experiment(results.get("run", path.name), str(path), values, config, basis=basis)


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


def metric_eps(metric: str, config: dict[str, object]) -> float | None:
    """The ε a `dvtrain eval` number was computed at, from that run's flattened config: eval.transfer.eps
    for black-box and transfer, eval.l2_eps for L2 attacks, eval.eps for the other attacks, none for clean."""
    if metric == "clean":
        return None
    if metric.startswith(BLACKBOX_PREFIX) or metric == TRANSFER_OFFDIAG:
        key = "eval.transfer.eps"
    else:
        key = "eval.l2_eps" if "l2" in metric.split("_") else "eval.eps"
    eps = config.get(key)
    return float(eps) if isinstance(eps, (int, float)) and eps else None


def metric_at_eps(metric: str, config: dict[str, object]) -> tuple[str, float | None, bool]:
    """A `dvtrain eval` summary metric as (metric, ε, recorded): the ε recorded in its name (worst_case_l2_eps0.5,
    bb_all_eps0.1: `dvtrain.eval.report.eval_summary`, since issue 26), else, for runs of an earlier dvtrain,
    the ε of the eval run's config (`metric_eps`; recorded False: that config may name an ε the number was not
    computed at, e.g. eval.l2_eps=0.3 with no L2 attack run, so the basis says so)."""
    name, found, eps = metric.rpartition(EPS_INFIX)[0], EPS_INFIX in metric, metric.rpartition(EPS_INFIX)[2]
    if found and name:
        try:
            return name, float(eps), True
        except ValueError:
            pass
    if metric == "clean" or not (metric in METRIC_ORDER or metric.startswith(BLACKBOX_PREFIX)):
        # Clean has no ε; a metric earlier releases never wrote (a plug-in table's) was named with its ε if it had one.
        return metric, None, True
    return metric, metric_eps(metric, config), False


def experiment_from_wandb(label: str, runs: list[tuple[str, str | None, dict, dict]], source: str) -> Experiment:
    """One experiment from its W&B runs (name, job type, config, summary): eval/<metric>/<model> (at
    eval/<metric>/eps) of each stage's run, eval/<stage>/<model>/<metric> of `dvtrain eval`'s, whose ε
    comes from its config. One metric at one ε is one column: `dvtrain eval`'s number replaces the
    training-time one. Tables and images are skipped."""
    training: dict[Column, float] = {}
    evaluated: dict[Column, float] = {}
    config: dict[str, object] = {}
    evaluation_config: dict[str, object] = {}
    unrecorded: set[Column] = set()
    for name, job_type, run_config, summary in runs:
        own_config = flatten(run_config)
        stage = _stage_of(name, job_type)
        # The experiment is what its training runs ran; the eval run's overrides (eval.*) are how it was
        # measured, which the † marks show, so they neither split a group nor become columns.
        (config if stage is not None else evaluation_config).update(own_config)
        numbers = {tuple(k.split("/")[1:]): v for k, v in summary.items()
                   if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in numbers.items():
            if len(key) == 3:
                metric, eps, recorded = metric_at_eps(key[2], own_config)
                evaluated[(key[0], key[1], metric, eps)] = float(value)
                if not recorded:
                    unrecorded.add((key[0], key[1], metric, eps))
            elif len(key) == 2 and stage is not None and key[1] != EPS:
                training[(stage, key[1], key[0], numbers.get((key[0], EPS)) or None)] = float(value)
    if not training and not evaluated:
        raise DvtrainError(f"the W&B runs of {source} have no evaluation numbers (summary keys eval/...); pass runs "
                           "of `dvtrain train` or `dvtrain eval` that finished")
    # Only a worst case changes meaning with the attacks that ran; W&B does not record which did.
    basis = {c: TRAINING_TIME for c in training if c[2].startswith(WORST_CASE)}
    basis |= {c: FULL_EVALUATION for c in evaluated if c[2].startswith(WORST_CASE)}
    basis |= {c: f"{basis[c]}; {EPS_FROM_CONFIG}" if c in basis else EPS_FROM_CONFIG for c in unrecorded}
    return Experiment(label, source, training | evaluated, evaluation_config | config, from_wandb=True, basis=basis,
                      trained=bool(training))


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
        for column, value in e.values.items():  # a training-time number never replaces `dvtrain eval`'s
            if first.basis.get(column) != FULL_EVALUATION or e.basis.get(column) == FULL_EVALUATION:
                first.values[column] = value
                if column in e.basis:
                    first.basis[column] = e.basis[column]
        first.config = (e.config | first.config) if not e.trained else (first.config | e.config)
        first.trained = first.trained or e.trained
        if e.source not in first.source.split(" "):
            first.source += " " + e.source
    return out


# ----------------------------------------------------------------------------- the table


def _stage_rank(stage: str) -> tuple:
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def _shown_order(shown: Shown) -> tuple:
    model, metric, eps = shown
    model_rank = (model != MIXTURE, int(model[3:]) if model[3:].isdigit() else 0, model)
    headline = HEADLINE.index(metric) if metric in HEADLINE else len(HEADLINE)
    metric_rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return model_rank, headline, metric_rank, metric, eps or 0.0


def shown_label(shown: Shown) -> str:
    """A table header: the metric's short name, the model where it is not the mixture, and the ε."""
    model, metric, eps = shown
    name = SHORT_NAMES.get(metric, metric)
    name = name if model == MIXTURE else f"{model_label('', model)} {name}"
    return f"{name} ε={format_eps(eps)}" if eps else name


def column_label(column: Column) -> str:
    """The stage and the header of a number: how CSV and W&B tables name it in one string."""
    stage, model, metric, eps = column
    return f"{stage} {shown_label((model, metric, eps))}"


def differing_keys(experiments: list[Experiment], ignore: tuple[str, ...] = ()) -> list[str]:
    """Config keys whose values are not the same in every experiment (a missing key counts as a value),
    except NOT_COMPARED ones (names, logging, evaluation settings) and `ignore`."""
    keys = sorted({k for e in experiments for k in e.config if not k.startswith(NOT_COMPARED + ignore)})
    return [k for k in keys if len({json.dumps(e.config.get(k), sort_keys=True) for e in experiments}) > 1]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Config key → header: a key longer than KEY_WIDTH as its first and last parts ("dverge_advt.….lr")
    where no other key of the table shortens to the same."""
    def shorten(key: str) -> str:
        parts = key.split(".")
        return f"{parts[0]}.….{parts[-1]}" if len(key) > KEY_WIDTH and len(parts) > 2 else key

    counts = Counter(shorten(k) for k in keys)
    return {k: shorten(k) if counts[shorten(k)] == 1 else k for k in keys}


def select_columns(experiments: list[Experiment], stage: str | None, submodels: bool, everything: bool) -> list[Shown]:
    """The table's columns, (model, metric, ε): every one present with `everything`, else the HEADLINE
    metrics, each at the one ε most experiments have (ties: the larger) — never two ε merged into one
    column. Only the mixture's unless `submodels`; only `stage`'s numbers if given."""
    def wanted(column: Column) -> bool:
        return (stage is None or column[0] == stage) and (submodels or column[1] == MIXTURE)

    for e in experiments:
        if not any(wanted(c) for c in e.values):
            raise DvtrainError(f"{e.source} has no numbers for stage {stage}; drop --stage or pass runs that have it")
    present = {(c[1], c[2], c[3]) for e in experiments for c in e.values if wanted(c)}
    if everything:
        return sorted(present, key=_shown_order)
    chosen = []
    headline_eps = None  # the L∞ worst case's ε: the other L∞ headline columns are shown at it where they have it
    for model, metric in dict.fromkeys((m, k) for m, k, _ in sorted(present, key=_shown_order) if k in HEADLINE):
        votes = Counter(eps for e in experiments
                        for eps in {c[3] for c in e.values if wanted(c) and (c[1], c[2]) == (model, metric)})
        eps = max(votes, key=lambda eps: (votes[eps], eps or 0.0))
        if metric == HEADLINE[1] and headline_eps is None:
            headline_eps = eps
        elif metric in AT_HEADLINE_EPS and headline_eps in votes:
            eps = headline_eps
        chosen.append((model, metric, eps))
    return chosen


def hidden_count(experiments: list[Experiment], columns: list[Shown], stage: str | None, submodels: bool) -> int:
    """How many (model, metric, ε) columns --all would add."""
    return len(set(select_columns(experiments, stage, submodels, True)) - set(columns))


@dataclass
class Row:
    """One row of the table: the experiments of a group (one without --group-by) at one stage."""

    label: str
    stage: str
    config: list[str]  # the differing config values, as shown
    cells: list[list[float]]  # per column: the values of the row's runs (one without --group-by)
    bases: list[list[str | None]]  # per column: what each of those values rests on (None: not known)
    members: list[list[str]]  # per column: the experiments those values come from
    runs: int = 1  # experiments in the row's group
    marks: list[bool] = field(default_factory=list)  # per column: not comparable with the rest of the column

    def parts(self, k: int) -> list[list[float]]:
        """Column k's values split by what they rest on (one part where every run shares a basis, or none is
        known): only values of one basis are ever averaged into one number (issue 26, finding 4)."""
        groups: dict[str | None, list[float]] = {}
        for value, basis in zip(self.cells[k], self.bases[k]):
            groups.setdefault(basis, []).append(value)
        return list(groups.values())


def table_rows(experiments: list[Experiment], columns: list[Shown], keys: list[str], group_by: list[str],
               stage: str | None = None) -> list[Row]:
    """One row per (experiment, stage), stages in training order; with `group_by`, one per set of
    experiments whose differing config keys agree except those in `group_by` (e.g. the seeds of one
    setting) and stage. Then marks the cells that are not comparable (see `mark_incomparable`)."""
    groups: dict[str, list[Experiment]] = {}
    for e in experiments:
        signature = json.dumps([e.config.get(k) for k in keys if k not in group_by], sort_keys=True)
        groups.setdefault(signature if group_by else str(id(e)), []).append(e)
    rows = []
    for members in groups.values():
        shown = [", ".join(dict.fromkeys(_show(m.config.get(k)) for m in members)) for k in keys]
        stages = sorted({c[0] for m in members for c in m.values if stage is None or c[0] == stage}, key=_stage_rank)
        for s in stages:
            cells = [[m.values[(s, *c)] for m in members if (s, *c) in m.values] for c in columns]
            if not any(cells):
                continue
            bases = [[m.basis.get((s, *c)) for m in members if (s, *c) in m.values] for c in columns]
            names = [[m.label for m in members if (s, *c) in m.values] for c in columns]
            rows.append(Row(", ".join(m.label for m in members), s, shown, cells, bases, names, len(members)))
    mark_incomparable(rows)
    return rows


def mark_incomparable(rows: list[Row]) -> None:
    """Mark, per stage and column, the cells whose numbers rest on another basis than most of the column's
    (other attacks in a worst case, another budget, other images; all of them where no basis is the
    majority), the cells of a group whose runs disagree among themselves, and W&B numbers of an earlier
    dvtrain whose ε was not recorded. Numbers whose basis is not known are never marked."""
    for row in rows:
        # A number whose ε was not recorded with it is always marked: its header's ε may not be its own.
        row.marks = [len(set(b for b in bases if b is not None)) > 1 or any(b and EPS_FROM_CONFIG in b for b in bases)
                     for bases in row.bases]
    for stage in dict.fromkeys(r.stage for r in rows):
        own = [r for r in rows if r.stage == stage]
        for k in range(len(own[0].cells)):
            known = Counter(b for r in own for b in r.bases[k] if b is not None)
            if len(known) < 2:
                continue
            (first, n_first), (_, n_second) = known.most_common(2)
            common = first if n_first > n_second else None  # no majority: every cell is marked
            for r in own:
                r.marks[k] = r.marks[k] or any(b not in (None, common) for b in r.bases[k])


def incomparable_notes(rows: list[Row], columns: list[Shown]) -> list[str]:
    """A legend line per column with a marked cell: which experiments' numbers rest on what, the stages
    that share that story named together."""
    said: dict[tuple[str, str], list[str]] = {}  # (column, what rests on what) → stages
    for stage in dict.fromkeys(r.stage for r in rows):
        own = [r for r in rows if r.stage == stage]
        for k, column in enumerate(columns):
            if not any(r.marks[k] for r in own):
                continue
            who: dict[str, list[str]] = {}
            for r in own:
                for name, b in zip(r.members[k], r.bases[k]):
                    if b is not None:
                        who.setdefault(b, []).append(name)
            story = " | ".join(f"{', '.join(names)}: {b}" for b, names in who.items())
            said.setdefault((shown_label(column), story), []).append(stage)
    return [f"{NOT_COMPARABLE} {column} ({', '.join(stages)}) — {story}" for (column, story), stages in said.items()]


def _show(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "—" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def cell_text(values: list[float], marked: bool = False, runs: int = 1, parts: list[list[float]] | None = None) -> str:
    """Two decimals; mean ± sample s.d. for several runs, "(n=k)" where only k of the row's `runs` have
    the number; † where not comparable with its column. Values on several bases (`parts`, as
    `Row.parts`) are never averaged: each basis's number, "/" between them, marked † (the legend says
    which run rests on what)."""
    if not values:
        return "—"
    if parts is not None and len(parts) > 1:
        return " / ".join(cell_text(part, False, len(part)) for part in parts) + NOT_COMPARABLE
    text = f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    text += f" (n={len(values)})" if len(values) < runs else ""
    return text + NOT_COMPARABLE if marked else text


def unique_labels(experiments: list[Experiment]) -> None:
    """Where two experiments share a name, name them by the arguments they came from."""
    names = [e.label for e in experiments]
    for e in experiments:
        if names.count(e.label) > 1:
            e.label = e.source


def markdown_table(rows: list[Row], keys: list[str], columns: list[Shown], grouped: bool) -> str:
    """The printed table: a row per (experiment, stage); an experiment's name and config values are
    written on its first row only, so its stages read as one block."""
    names = short_keys(keys)
    header = ["Run", *(names[k] for k in keys), *(["n"] if grouped else []), "Stage", *(shown_label(c) for c in columns)]
    lines = ["| " + " | ".join(header) + " |",
             "|---" * (2 + len(keys)) + "|---:" * (len(header) - 2 - len(keys)) + "|"]
    previous = None
    for row in rows:
        first = (row.label, row.config) != previous
        previous = (row.label, row.config)
        lead = [row.label, *row.config, *([str(row.runs)] if grouped else [])] if first else [""] * (1 + len(keys) + grouped)
        lines.append("| " + " | ".join([*lead, row.stage, *(cell_text(v, m, row.runs, row.parts(k))
                                                              for k, (v, m) in enumerate(zip(row.cells, row.marks)))]) + " |")
    return "\n".join(lines) + "\n"


def legend(rows: list[Row], keys: list[str], columns: list[Shown], grouped: bool, hidden: int) -> str:
    """The lines under the table: what the numbers are, abbreviated keys, † notes, what --all adds."""
    lines = [LEGEND + (" Cells: mean ± s.d. over the n runs of a row; (n=k): over the k of them that have the number."
                       if grouped else "")]
    short = {k: v for k, v in short_keys(keys).items() if k != v}
    if short:
        lines.append("Config keys: " + ", ".join(f"{v} = {k}" for k, v in short.items()) + ".")
    lines += incomparable_notes(rows, columns)
    if hidden:
        lines.append(f"{hidden} more columns (other attacks, models or ε): --all.")
    return "\n".join(textwrap.fill(line, TERMINAL_WIDTH, subsequent_indent="  ") for line in lines)


def write_csv(path: Path, rows: list[Row], keys: list[str], columns: list[Shown], grouped: bool) -> None:
    """The same numbers at full precision, one row per (experiment, stage); with --group-by the row's
    number of runs n, and per number its s.d. (empty where one run has it) and how many runs have it;
    empty cells where a row lacks a number."""
    def mean(parts: list[list[float]]) -> str:  # several bases: each basis's mean, never one over them
        return " / ".join(repr(statistics.mean(p)) for p in parts if p)

    def spread(parts: list[list[float]]) -> list[object]:
        sd = " / ".join(repr(statistics.stdev(p)) if len(p) > 1 else "" for p in parts if p)
        return [sd.strip(" /") and sd, " / ".join(str(len(p)) for p in parts if p) or 0] if grouped else []

    with storage.replacing(path, "--csv") as tmp, open(tmp, "w", newline="") as f:  # whole, then renamed
        writer = csv.writer(f)
        writer.writerow(["run", *keys, *(["n"] if grouped else []), "stage",
                         *(part for c in columns
                           for part in [shown_label(c), *([shown_label(c) + " sd", shown_label(c) + " n"] if grouped else [])])])
        for row in rows:
            writer.writerow([row.label, *row.config, *([row.runs] if grouped else []), row.stage,
                             *(part for k in range(len(row.cells)) for part in [mean(row.parts(k)), *spread(row.parts(k))])])


def log_comparison(mode: str, project: str, entity: str | None, wandb_dir: Path, rows: list[Row], keys: list[str],
                   columns: list[Shown], sources: list[str], plots: dict[str, Path]) -> None:
    """A new W&B run (job type compare) holding the table (means) as a wandb.Table and the charts as wandb.Images."""
    from dvtrain.tracking import Tracker

    tracker = Tracker(LoggingConfig(wandb=mode, project=project, entity=entity, progress=False), wandb_dir,
                      "dvtrain", "compare", {"runs": sources}, active=True)
    if tracker.run is None:
        return
    import wandb

    exit_code = 1
    try:
        table = wandb.Table(columns=["run", *keys, "stage", *(shown_label(c) for c in columns)],
                            data=[[row.label, *row.config, row.stage,
                                   *(statistics.mean(v) if v and len(row.parts(k)) == 1 else None
                                     for k, v in enumerate(row.cells))] for row in rows])
        # One key per figure (compare/accuracy, compare/transfer or compare/transfer_eps0.1, ...): never two under one.
        tracker.run.log({"compare/table": table}
                        | {f"compare/{kind}": wandb.Image(str(plot)) for kind, plot in plots.items()})
        exit_code = 0
    finally:
        hint = tracker.sync_hint()
        tracker.finish(exit_code)
    if hint is not None:
        print(f"[compare] {hint}", file=sys.stderr, flush=True)  # stdout keeps the table alone


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvtrain compare",
        description="Compare the evaluation numbers of runs side by side: by default the headline figures "
                    "(clean, worst case per norm, black-box, transferability), one row per run and stage.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directory, its wandb folder (RUN_DIR/wandb), an offline W&B run "
                             "(RUN_DIR/wandb/offline-run-*) or an online W&B group or run (entity/project/GROUP_OR_RUN_ID)")
    parser.add_argument("--stage", help="only this stage's rows")
    parser.add_argument("--submodels", action="store_true", help="also every submodel's columns")
    parser.add_argument("--all", "--full", dest="everything", action="store_true",
                        help="every metric at every ε, not only the headline figures")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="config key the runs of one row may differ in, e.g. seed: one row of mean ± s.d. per "
                             "setting of the other keys (repeatable)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV (full precision)")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="also draw the table as bar charts, one PNG per kind of number: FILE's stem + _accuracy.png "
                             "and, where there are transfer numbers, + _transfer.png")
    parser.add_argument("--wandb", choices=[m for m in WANDB_MODES if m != "disabled"],
                        help="log the table and charts to a new W&B run (auto: online with a key, else offline)")
    parser.add_argument("--project", default=LoggingConfig.project, help="W&B project for --wandb")
    parser.add_argument("--entity", help="W&B entity for --wandb")
    parser.add_argument("--wandb-dir", type=Path, default=Path("."), help="where --wandb writes its files (DIR/wandb/)")
    return parser


def plot_kind(metric: str) -> str | None:
    """The figure a metric is drawn in: "transfer" (success in %, lower is better), "accuracy" for what is
    known to be an accuracy in % (a white-box attack's or worst case's, dvtrain's or a plug-in attack's,
    and the black-box table's bb_*), None for anything else (a plug-in table's number may be any quantity:
    the table shows it, no figure claims it on an accuracy axis)."""
    from dvtrain.eval.attacks.registry import L2, LINF, attacks

    if metric in LOWER_IS_BETTER:
        return "transfer"
    whitebox = {metric_name(a, norm) for a in (WORST_CASE, *attacks()) for norm in (None, LINF, L2)}
    return "accuracy" if metric in whitebox or metric.startswith(BLACKBOX_PREFIX) else None


def draw(rows: list[Row], columns: list[Shown], path: Path) -> tuple[list[Path], list[str]]:
    """The comparison charts (see `dvtrain.eval.plots.comparison_plots`): accuracies, and transfer success;
    columns of another kind (`plot_kind`) are left out. A cell on several bases is drawn as one bar per basis
    ("run (basis k)"), never one bar over them; every bar of a cell marked † in the table is marked † in the
    figure, and a bar over fewer runs than its row's is marked "n=k". Returns the files written and the
    headers of the columns left out."""
    from dvtrain.eval.plots import comparison_plots

    kinds = {shown_label(c): plot_kind(c[1]) for c in columns}
    series: dict[str, dict] = {}
    runs: dict[str, int] = {}
    marked: set[tuple[str, str, str]] = set()
    for row in rows:
        for k, (column, values) in enumerate(zip(columns, row.cells)):
            if not values or kinds[shown_label(column)] is None:
                continue
            parts = row.parts(k)
            for j, part in enumerate(parts):
                label = row.label if len(parts) == 1 else f"{row.label} (basis {j + 1})"
                series.setdefault(label, {})[(row.stage, shown_label(column))] = part
                runs[label] = row.runs
                if row.marks[k] or len(parts) > 1:
                    marked.add((label, row.stage, shown_label(column)))
    drawn = {c: k for c, k in kinds.items() if k is not None}
    written = comparison_plots(series, drawn, [s for s in dict.fromkeys(r.stage for r in rows)], path, marked,
                               PLOT_KIND_SEPARATOR, runs)
    return written, [c for c, k in kinds.items() if k is None]


def compare_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options between the runs too: RUN1 --all RUN2 --group-by seed
    try:
        experiments = merge_wandb_groups([e for arg in args.runs for e in read_source(arg)])
        known = {k for e in experiments for k in e.config}
        unknown = [k for k in args.group_by if k not in known]
        if unknown:
            raise DvtrainError(f"--group-by {unknown[0]} is not a config key of these runs; pass a dotted key such as "
                               "seed or dverge.eps")
        columns = select_columns(experiments, args.stage, args.submodels, args.everything)
        unique_labels(experiments)
        keys = differing_keys(experiments)
        grouped = bool(args.group_by)
        rows = table_rows(experiments, columns, keys, args.group_by, args.stage)
        hidden = 0 if args.everything else hidden_count(experiments, columns, args.stage, args.submodels)
        print(markdown_table(rows, keys, columns, grouped) + "\n" + legend(rows, keys, columns, grouped, hidden), flush=True)
        if args.csv:
            write_csv(args.csv, rows, keys, columns, grouped)
        if args.plot or args.wandb:
            with tempfile.TemporaryDirectory() as tmp:
                base = args.plot or Path(tmp) / "compare.png"
                plots, left_out = draw(rows, columns, base)
                if args.plot:
                    print("plots: " + ", ".join(str(p) for p in plots), flush=True)
                if left_out:
                    print(f"not drawn, not known to be accuracies (%): {', '.join(left_out)} (the table shows them)",
                          flush=True)
                if args.wandb:
                    kinds = {p.stem.removeprefix(base.stem + PLOT_KIND_SEPARATOR): p for p in plots}
                    log_comparison(args.wandb, args.project, args.entity, args.wandb_dir, rows, keys, columns,
                                   args.runs, kinds)
        return 0
    except DvtrainError as exc:
        print(f"dvtrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"dvtrain: error: cannot write {exc.filename} ({exc.strerror}); choose a writable path", file=sys.stderr)
        return EXIT_USER_ERROR
