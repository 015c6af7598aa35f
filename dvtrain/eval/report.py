"""Results I/O, the one place that reads and writes a run's results.json and results.md.

results.json holds "eval" (white-box rows, see `dvtrain.eval.whitebox`), "stages" (training time per
stage, written by the training loop), and what `dvtrain eval` adds: "checks" (gradient-masking
verdicts per stage), "transfer", "blackbox" (each stage's table with the protocol it was measured with;
files before issue 26 hold one global "blackbox_surrogate" instead), "eps_sweep", "plots". Both files
are written atomically (a temporary file renamed over the old one), so a crash never leaves half a file.

The white-box rows accumulate: a row is keyed by (table, stage, model, attack, norm, ε, budget), where
table says which command produced it ("train": the table after each stage; "eval": `dvtrain eval`)
and budget is what else determines the number (`dvtrain.eval.whitebox.cell_budget`). An evaluation at
another ε or budget adds rows; one with the same key replaces just that row. Every write is a
read-modify-write of the file on disk under the run directory's lock (`update_results`), so
concurrent `dvtrain eval --stage A` and `--stage B` both land. results.md is rendered from the store.
"""

from __future__ import annotations

from pathlib import Path

from collections.abc import Callable

from dvtrain import results as results_store
from dvtrain import rundir
from dvtrain.rundir import PLOTS, RunDir
from dvtrain.config import STAGES, Config
from dvtrain.eval.attacks.registry import ATTACKS, EACH_AUTOATTACK_NORM
from dvtrain.eval.headline import Headline, headline_markdown
from dvtrain.eval.tables import registry as tables
from dvtrain.results import ROW_KEY, merge_rows, row_key  # noqa: F401  (the store's, re-exported for training)

RESULTS_JSON = rundir.RESULTS_JSON
RESULTS_MD = rundir.RESULTS_MD
TRAIN_TABLE, EVAL_TABLE = "train", "eval"  # the row field "table": which command produced the row
WORST_CASE = "worst_case"
# Attacks whose name does not say the norm (they run at several): metric names add it.
BLACKBOX_PREFIX = "bb_"
TRANSFER_OFFDIAG = "transfer_offdiag"
MIXTURE = "mixture"
NOT_COMPARABLE = "†"  # a number on another basis than the rest of its column (tables and figures alike)
WORST_CASE_HEADER = "**Worst case**"
_NORM_SYMBOL = {"Linf": "L∞", "L2": "L2"}


def counted(n: int, noun: str) -> str:
    """"1 restart", "2 restarts": results.md's counts read as English."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def load_results(run_dir: Path) -> dict:
    """results.json of a run, validated (`dvtrain.results.load_results`), or an empty store if there is none yet."""
    return results_store.load_results(run_dir)


def render_results(cfg: Config, run_dir: Path) -> Callable[[dict], str]:
    """results.md of a run as a function of its results (what `dvtrain.results` writes beside results.json):
    a summary (the headline figures per stage, `dvtrain.eval.headline`, and a link to every figure in the
    run's plots folder), then every table."""
    def render(results: dict) -> str:
        results["run"] = cfg.name
        header = f"# dvtrain results: {cfg.name}\n\ndata: {cfg.data.name}, model: {cfg.model.arch} ×{cfg.ensemble.size}\n\n"
        order = stage_order(results["stages"], cfg.stages)
        epochs = "".join(
            f"- {stage}: {results['stages'][stage]['epochs']} epochs, {results['stages'][stage]['train_s']:.0f} s training\n"
            for stage in order
        )
        evaluated = stage_order({r["stage"] for r in results["eval"]}, cfg.stages)
        summary = headline_markdown(results, evaluated, Headline(cfg.eval.eps, cfg.eval.l2_eps))
        tables = results_markdown(results["eval"], results.get("checks", {}), cfg.stages) + evaluation_markdown(results)
        return header + epochs + "\n" + summary + figure_links(run_dir, results, order) + tables

    return render


def _named_figures(node: object) -> set[str]:
    """Every figure path ("plots/….png") a results.json value names, at any depth."""
    if isinstance(node, dict):
        return set().union(*map(_named_figures, node.values()))
    if isinstance(node, list):
        return set().union(*map(_named_figures, node))
    return {node} if isinstance(node, str) and node.startswith(PLOTS + "/") and node.endswith(".png") else set()


def figure_links(run_dir: Path, results: dict, stages: list[str]) -> str:
    """'Figures:' and a Markdown link to every figure of the run's current numbers, each stage's together in
    `stages` order: the loss curves training draws and each figure results.json names (a table's "plots"
    entry or its own, e.g. a diversity heat map). A figure of weights a stage has since replaced is no longer
    named (`dvtrain.results.forget_stage`) and so not linked, though its file stays. '' when there is none."""
    run = RunDir(run_dir)
    named = {run.path / relative for relative in _named_figures({k: v for k, v in results.items() if k != "eval"})}
    files = sorted(p for p in named | {run.loss_curve(stage) for stage in results.get("stages", {})} if p.is_file())
    if not files:
        return ""
    def owner(path: Path) -> int:
        named = [k for k, stage in enumerate(stages) if path.stem.startswith(stage + "_") or path.stem.endswith("_" + stage)]
        return max(named, default=len(stages))  # "dverge_advt_loss" belongs to dverge_advt, not dverge
    links = [f"[{path.stem}]({PLOTS}/{path.name})" for path in sorted(files, key=lambda p: (owner(p), p.name))]
    return "Figures: " + " · ".join(links) + "\n\n"


def save_results(run_dir: Path, cfg: Config, results: dict) -> None:
    """Write results.json and results.md as one step (call it on the main process only, holding
    `RunDir.lock()`; `update_results` does both)."""
    results_store.write_results(run_dir, results, render_results(cfg, run_dir)(results))


def update_results(run_dir: Path, cfg: Config, change: Callable[[dict], None]) -> dict:
    """Read results.json, apply `change(results)` to it in place, write results.json and results.md;
    all under the run directory's inter-process lock, so concurrent writers never lose each other's
    rows. Returns the results as written (main process only)."""
    return results_store.update_results(run_dir, change, render_results(cfg, run_dir))


def record_training_table(run_dir: Path, cfg: Config, stage: str, rows: list[dict], stage_info: dict,
                          provenance: dict | None) -> dict:
    """The training loop's one call after a stage: its white-box table (rows of
    `dvtrain.eval.whitebox.evaluate_stage`) as the "train" table of `stage`, every earlier number of the
    stage dropped (its weights are new), `stage_info` under "stages", `provenance`. Returns the store."""
    return results_store.record_table(run_dir, stage, rows, TRAIN_TABLE, "dvtrain train", stage_info, provenance,
                                      render_results(cfg, run_dir))


# ----------------------------------------------------------------------------- names and numbers


def metric_name(attack: str, norm: str | None) -> str:
    """A row's metric name: the attack, with the norm added where the name does not say it
    (autoattack_linf, worst_case_l2); what W&B summaries and `dvtrain compare` use."""
    return f"{attack}_{norm.lower()}" if norm_suffixed(attack) and norm else attack


def norm_suffixed(attack: str) -> bool:
    """Whether an attack's name does not say its norm (it runs at several: AutoAttack; the worst case), so
    that its metric names add it. Reads the registered records without loading plug-ins (no torch here)."""
    record = ATTACKS.get(attack)
    return attack == WORST_CASE or (record is not None and record.norm == EACH_AUTOATTACK_NORM)


METRIC_ORDER = (
    *(metric_name(WORST_CASE, n) for n in ("Linf", "L2")),
    *(m for a in ATTACKS for m in ([metric_name(a, n) for n in ("Linf", "L2")] if norm_suffixed(a) else [a])),
    BLACKBOX_PREFIX + "all",
    TRANSFER_OFFDIAG,
)  # then any other metric (a plug-in table's, an older release's), by name


def mean_off_diagonal(matrix: dict) -> float | None:
    """Mean success (%) of submodel i's examples on the other submodels j ≠ i, from a results.json transfer
    matrix ({"sources": [...], "success": [[...]]}, `dvtrain.eval.transfer.transfer_matrix`): the number
    DVERGE lowers (Yang et al., NeurIPS 2020, §5). Cells that are None (nothing to attack) are skipped;
    None when no cell has a number."""
    m = len(matrix["sources"])
    values = [matrix["success"][i][j] for i in range(m) for j in range(m) if i != j]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def result_metrics(results: dict) -> dict[tuple[str, str, str], float]:
    """Every number of a results.json as (stage, model, metric) → value: white-box accuracies under
    `metric_name`, then every registered table's numbers under their names (`Table.numbers`: black-box "all"
    accuracies as bb_all_eps<ε>, the mixture row's transfer_offdiag, mean off-diagonal transfer *success*,
    lower is better). What `dvtrain eval` logs as its W&B table."""
    out = {(r["stage"], r["model"], metric_name(r["attack"], r.get("norm"))): r["accuracy"] for r in results.get("eval", [])}
    out.update({(n.stage, n.model, n.name): n.value for table in tables.tables() for n in table.numbers(results)})
    return {key: value for key, value in out.items() if value is not None}


def result_rows(results: dict) -> list[dict]:
    """Every white-box row of a results.json with its metric name, oldest first (the newest row of a
    (stage, model, metric) is what `result_metrics` gives): {stage, model, metric, value (%), attack,
    norm, eps, budget, n, table}. Unlike `result_metrics`, rows at two ε or budgets stay apart; budget
    and table are None for rows of older dvtrain releases."""
    return [{"stage": r["stage"], "model": r["model"], "metric": metric_name(r["attack"], r.get("norm")),
             "value": r["accuracy"], "attack": r["attack"], "norm": r.get("norm"), "eps": r.get("eps"),
             "budget": r.get("budget"), "n": r.get("n"), "table": r.get("table")}
            for r in results.get("eval", []) if r.get("accuracy") is not None]


def metric_key(stage: str, model: str, metric: str) -> str:
    """The W&B summary key of a number: eval/<stage>/<model>/<metric>."""
    return f"eval/{stage}/{model}/{metric}"


EPS_INFIX = "_eps"  # <metric>_eps<ε>: a number named with the ε it was computed at


def metric_at(metric: str, eps: float | None) -> str:
    """A metric named with its ε (worst_case_l2_eps0.5; clean and numbers without an ε as they are), so a
    reader never takes the ε from a config that may name another one (issue 26, finding 3)."""
    if not eps or metric.startswith(BLACKBOX_PREFIX + "all" + EPS_INFIX):
        return metric
    return f"{metric}{EPS_INFIX}{eps:g}"


def eval_summary(results: dict) -> dict[str, float]:
    """`dvtrain eval`'s W&B summary: every number under eval/<stage>/<model>/<metric>_eps<ε>, each at the ε
    it was computed at: white-box rows (of either table, `dvtrain eval`'s winning at one key), then every
    registered table's numbers (`Table.numbers`: black-box "all" per ε as bb_all_eps<ε>, the transfer
    matrix's mean off-diagonal success at its ε, a plug-in table's own)."""
    out: dict[str, float] = {}
    rows = sorted(results.get("eval", []), key=lambda r: r.get("table") == EVAL_TABLE)  # eval's rows last: they win
    for r in rows:
        if r.get("accuracy") is not None:
            out[metric_key(r["stage"], r["model"], metric_at(metric_name(r["attack"], r.get("norm")), r.get("eps")))] = r["accuracy"]
    for table in tables.tables():
        out.update({metric_key(n.stage, n.model, metric_at(n.metric, n.eps)): n.value for n in table.numbers(results)
                    if n.value is not None})
    return out


def evaluation_markdown(results: dict) -> str:
    """The sections `dvtrain eval` adds to results.md after the white-box tables, every registered table's
    in registry order (`Table.markdown`; empty when none has entries); plots are linked by their path under
    the run directory, as results["plots"] records them."""
    return "\n".join(line for table in tables.tables() for line in table.markdown(results))


# ----------------------------------------------------------------------------- markdown


def model_label(stage: str, model: str) -> str:
    if model == "mixture":
        return "Mixture (plain ensemble)" if stage == "vanilla" else "Mixture"
    return f"Submodel {int(model.removeprefix('sub')) + 1}"


def format_eps(eps: float) -> str:
    """ε as k/255 when it is one (the usual way of writing image budgets), else as a short decimal."""
    k = round(eps * 255)
    return f"{k}/255" if 0 < k < 255 and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def stage_order(stages, trained: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`stages` in training order: the run's configured order (`trained`, i.e. cfg.stages) first, then
    dvtrain's stage order (config.STAGES), then by name."""
    order = list(dict.fromkeys([*trained, *STAGES]))
    return sorted(dict.fromkeys(stages), key=lambda s: (order.index(s) if s in order else len(order), s))


def attack_header(attack: str) -> str:
    """An attack's name in tables and figures ("PGD margin", "AutoAttack")."""
    if attack == WORST_CASE:
        return WORST_CASE_HEADER
    record = ATTACKS.get(attack)  # a plug-in's record once its entry point is loaded (dvtrain eval loads them)
    return attack if record is None else record.header


def _column_label(attack: str, norm: str | None, eps: float) -> str:
    if norm is None:
        return f"{attack_header(attack)} (%)"
    return f"{attack_header(attack)} {_NORM_SYMBOL.get(norm, norm)} ε={format_eps(eps)} (%)"


def _accuracy_cell(row: dict | None) -> str:
    if row is None:
        return "—"
    spread = f" ± {row['sd']:.2f}" if "sd" in row else ""
    interval = f" [{row['ci_low']:.1f}, {row['ci_high']:.1f}]" if "ci_low" in row else ""
    return f"{row['accuracy']:.2f}{spread}{interval}"


TABLE_TITLES = {TRAIN_TABLE: "table written by `dvtrain train` after the stage (eval.attacks)",
                EVAL_TABLE: "table written by `dvtrain eval` (eval.full_attacks)"}


def _table_title(table: str | None, commands: list[str]) -> str:
    title = TABLE_TITLES.get(table, "table written by an earlier dvtrain (command and budget not recorded)")
    return title + "".join(f"; command: `{c}`" for c in commands)


def results_markdown(rows: list[dict], checks: dict[str, list[str]] | None = None,
                     trained: list[str] | tuple[str, ...] = ()) -> str:
    """Per stage in training order (`stage_order`), one table per command that produced rows (the
    training-time table first), headed by that command; a row per model, a column per (attack, norm,
    ε, budget), so rows at two ε or budgets stand side by side, the worst cases right after the clean
    column; then each column's budget and, under `dvtrain eval`'s table, the gradient-masking check lines."""
    checks = checks or {}
    out = []
    for stage in stage_order({row["stage"] for row in rows}, trained):
        tables = list(dict.fromkeys(r.get("table") for r in rows if r["stage"] == stage))
        tables.sort(key=lambda t: (t != TRAIN_TABLE, t != EVAL_TABLE))
        for table in tables:
            own = [r for r in rows if r["stage"] == stage and r.get("table") == table]
            out.append(_table_markdown(stage, table, own, checks.get(stage) if table in (EVAL_TABLE, None) else None))
    return "\n".join(out)


def _column_budget(row: dict) -> str | None:
    """The budget a row's column is told apart by: a worst case's images only (its submodel and mixture
    rows combine different attack sets, the row's "of" names them), any other row's whole budget."""
    budget = row.get("budget")
    return budget.split(",of=")[0] if budget and row["attack"] == WORST_CASE else budget


def _table_markdown(stage: str, table: str | None, own: list[dict], checks: list[str] | None) -> str:
    commands = list(dict.fromkeys(r.get("command") for r in own))
    cells, group = {}, {}
    for r in own:
        column = (r["attack"], r.get("norm"), r["eps"], _column_budget(r))
        cells[(r["model"], *column)] = r
        group.setdefault(column, commands.index(r.get("command")))
    # Clean first; then each command's columns together (rows at another ε or budget beside the first
    # ones, never merged into them), its worst cases first.
    columns = sorted(group, key=lambda c: (c[0] != "clean", group[c], c[0] != WORST_CASE))
    labels = [_column_label(a, n, e).removesuffix(" (%)") for a, n, e, _ in columns]
    labels = [f"{label} [{k + 1}] (%)" if labels.count(label) > 1 else f"{label} (%)" for k, label in enumerate(labels)]
    models = list(dict.fromkeys(r["model"] for r in own))
    sizes = sorted({r["n"] for r in own if "n" in r})
    seeds = max((len(r.get("seed_accuracies", [])) for r in own), default=0)
    note = (f"n = {', '.join(map(str, sizes))} test images (each column's own, see budgets); accuracy (%) with its "
            "95 % Wilson interval" + (f"; ± s.d. over {seeds} seeds of the randomised attacks" if seeds > 1 else "")
            + "; worst case: images that survive every attack of that norm.") if sizes else ""
    lines = [f"### {stage}", "", _table_title(table, [c for c in commands if c]) + ".", "", *([note, ""] if note else []),
             "| Model | " + " | ".join(labels) + " |", "|---" + "|---:" * len(columns) + "|"]
    for model in models:
        lines.append("| " + " | ".join([model_label(stage, model),
                                        *(_accuracy_cell(cells.get((model, *c))) for c in columns)]) + " |")
    budgets = [(label, c[3]) for label, c in zip(labels, columns) if c[3]]
    if budgets:
        lines += ["", "Budgets:", *(f"- {label.removesuffix(' (%)')}: {b}" for label, b in budgets)]
    if checks:
        lines += ["", *(f"- {line}" for line in checks)]
    return "\n".join(lines) + "\n"


def matrix_markdown(stage: str, rows: list[str], columns: list[str], values: list[list]) -> list[str]:
    def label(name: str) -> str:
        return model_label(stage, name) if name.startswith(("sub", "mixture")) else name

    lines = ["| | " + " | ".join(label(c) for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    lines += ["| " + " | ".join([label(r), *(cell(v) for v in row)]) + " |" for r, row in zip(rows, values)]
    return lines


def blackbox_protocol(results: dict, stage: str) -> dict:
    """The black-box protocol a stage's table was measured with: its own ("protocol" in the table, since
    issue 26), else the one global "blackbox_surrogate" entry of results.json files written before (which
    described the last evaluation only); {} when neither is there."""
    table = results.get("blackbox", {}).get(stage, {})
    return table.get("protocol") or results.get("blackbox_surrogate") or {}
