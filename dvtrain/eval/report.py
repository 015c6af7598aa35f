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

import json
from pathlib import Path

from collections.abc import Callable

from dvtrain import results as results_store
from dvtrain import rundir
from dvtrain.rundir import PLOTS, RunDir
from dvtrain.config import STAGES, Config
from dvtrain.eval.attack_registry import ATTACKS, EACH_AUTOATTACK_NORM
from dvtrain.eval.headline import Headline, headline_markdown
from dvtrain.results import ROW_KEY, merge_rows, row_key  # noqa: F401  (the store's, re-exported for training)

RESULTS_JSON = rundir.RESULTS_JSON
RESULTS_MD = rundir.RESULTS_MD
TRAIN_TABLE, EVAL_TABLE = "train", "eval"  # the row field "table": which command produced the row
FULL_EVALUATION_KEYS = tuple(k for k in results_store.STAGE_SECTIONS if k != "plots")  # per-stage keys only `dvtrain eval` writes
WORST_CASE = "worst_case"
# Attacks whose name does not say the norm (they run at several): metric names add it.
NORM_SUFFIXED = (*(name for name, a in ATTACKS.items() if a.norm == EACH_AUTOATTACK_NORM), WORST_CASE)
BLACKBOX_PREFIX = "bb_"
BLACKBOX_ATTACKS = ("mi_pgd", "m_di2_fgsm", "all")
TRANSFER_OFFDIAG = "transfer_offdiag"
NOT_COMPARABLE = "†"  # a number on another basis than the rest of its column (tables and figures alike)
_HEADERS = {name: a.header for name, a in ATTACKS.items()} | {WORST_CASE: "**Worst case**"}
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
        return header + epochs + "\n" + summary + figure_links(run_dir, order) + tables

    return render


def figure_links(run_dir: Path, stages: list[str]) -> str:
    """'Figures:' and a Markdown link to every PNG in the run's plots folder (the loss curves training draws,
    every evaluation figure), each stage's together in `stages` order; '' when there is none."""
    files = sorted(RunDir(run_dir).plots.glob("*.png"))
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
    return f"{attack}_{norm.lower()}" if attack in NORM_SUFFIXED and norm else attack


METRIC_ORDER = (
    *(metric_name(WORST_CASE, n) for n in ("Linf", "L2")),
    *(m for a in ATTACKS for m in ([metric_name(a, n) for n in ("Linf", "L2")] if a in NORM_SUFFIXED else [a])),
    *(BLACKBOX_PREFIX + a for a in BLACKBOX_ATTACKS),
    TRANSFER_OFFDIAG,
)


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
    `metric_name`, black-box "all" accuracies as bb_all_eps<ε> (`blackbox_metrics`), and the mixture row's transfer_offdiag
    (mean off-diagonal transfer *success*, lower is better). What `dvtrain compare` tabulates."""
    out = {(r["stage"], r["model"], metric_name(r["attack"], r.get("norm"))): r["accuracy"] for r in results.get("eval", [])}
    for stage, table in results.get("blackbox", {}).items():
        out.update({(stage, model, metric): value for (model, metric), value in blackbox_metrics(table).items()})
    for stage, matrix in results.get("transfer", {}).items():
        out[(stage, "mixture", TRANSFER_OFFDIAG)] = mean_off_diagonal(matrix)
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


def blackbox_metrics(table: dict) -> dict[tuple[str, str], float | None]:
    """(model, metric) → accuracy of one stage's black-box table: "all" per ε as bb_all_eps<ε> (the paper's
    curve). A results.json of dvtrain before the ε sweep (one ε, columns per attack) gives bb_<attack>."""
    if "all" not in table:
        return {(model, BLACKBOX_PREFIX + attack): table["accuracy"][m][a]
                for m, model in enumerate(table["models"]) for a, attack in enumerate(table["attacks"])}
    return {(model, f"{BLACKBOX_PREFIX}all_eps{eps:g}"): table["all"][m][k]
            for m, model in enumerate(table["models"]) for k, eps in enumerate(table["eps"])}


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
    it was computed at: white-box rows (of either table, `dvtrain eval`'s winning at one key), black-box
    "all" per ε (bb_all_eps<ε>), the transfer matrix's mean off-diagonal success at its ε."""
    out: dict[str, float] = {}
    rows = sorted(results.get("eval", []), key=lambda r: r.get("table") == EVAL_TABLE)  # eval's rows last: they win
    for r in rows:
        if r.get("accuracy") is not None:
            out[metric_key(r["stage"], r["model"], metric_at(metric_name(r["attack"], r.get("norm")), r.get("eps")))] = r["accuracy"]
    for stage, table in results.get("blackbox", {}).items():
        out.update({metric_key(stage, model, metric): value for (model, metric), value in blackbox_metrics(table).items()
                    if value is not None})
    for stage, matrix in results.get("transfer", {}).items():
        off = mean_off_diagonal(matrix)
        if off is not None:
            out[metric_key(stage, "mixture", metric_at(TRANSFER_OFFDIAG, matrix.get("eps")))] = off
    return out


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
    return _HEADERS.get(attack, attack)


def _column_label(attack: str, norm: str | None, eps: float) -> str:
    if norm is None:
        return f"{_HEADERS.get(attack, attack)} (%)"
    return f"{_HEADERS.get(attack, attack)} {_NORM_SYMBOL.get(norm, norm)} ε={format_eps(eps)} (%)"


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


def _matrix_markdown(stage: str, rows: list[str], columns: list[str], values: list[list]) -> list[str]:
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


def _protocol_identity(protocol: dict, table: dict) -> str:
    """What must agree for stages to share one black-box section: the protocol and the sets at each ε."""
    return json.dumps([protocol, table.get("eps"), table.get("sets")], sort_keys=True)


def _blackbox_markdown(results: dict) -> list[str]:
    """The black-box section(s) (`dvtrain.eval.blackbox`): one per protocol, the stages measured with it
    together, each drawn with its own ε grid and example sets (never under another stage's headers)."""
    tables = results.get("blackbox", {})
    stages = [s for s in stage_order(tables) if "all" in tables[s]]
    groups: dict[str, list[str]] = {}
    for stage in stages:
        groups.setdefault(_protocol_identity(blackbox_protocol(results, stage), tables[stage]), []).append(stage)
    out = []
    for k, members in enumerate(groups.values()):
        title = "## Black-box transfer" + (f" (protocol {k + 1} of {len(groups)}: {', '.join(members)})"
                                           if len(groups) > 1 else "")
        out += _blackbox_group_markdown(title, {s: tables[s] for s in members}, blackbox_protocol(results, members[0]))
    return out


def _blackbox_group_markdown(title: str, tables: dict[str, dict], protocol: dict) -> list[str]:
    """"all" per ε for every stage and model of one protocol, then one detailed table per ε (a column per
    surrogate ensemble × attack × loss), the surrogates' own rows first."""
    from dvtrain.eval.blackbox import set_label

    stages = list(tables)
    first = tables[stages[0]]
    eps_grid = first["eps"]
    sizes = ", ".join(str(s["size"]) for s in protocol.get("surrogates", []))
    described = ([f"Accuracy (%) on {protocol['n_images']} test images (seed {protocol['seed']}) under transfer examples "
                  f"crafted on hold-out plain ensembles of {sizes} models of this architecture with momentum PGD "
                  f"({counted(protocol['restarts'], 'random start')}), M-DI²-FGSM (p {protocol['di_prob']:g}) and SGM (γ "
                  f"{protocol['sgm_gamma']:g}), {protocol['steps']} steps each, losses "
                  f"{', '.join(l.upper() for l in protocol['losses'])}"
                  + (f", surrogates trained {', '.join(str(s['epochs']) for s in protocol['surrogates'])} epochs"
                     if all("epochs" in s for s in protocol.get("surrogates", [])) else "")
                  + ". A set counts an image correct only under all its runs; \"all\": correct under every set at "
                  f"that ε. Example sets and surrogates are shared by every run on the same data ({protocol['cache']})."]
                 if protocol else ["Protocol not recorded (results.json of an earlier dvtrain)."])
    lines = [title, "", *described, "",
             *(f"- {note}" for note in protocol.get("notes", [])), *([""] if protocol.get("notes") else []),
             "| Stage | Model | " + " | ".join(f"all ε={format_eps(e)}" for e in eps_grid) + " |",
             "|---|---" + "|---:" * len(eps_grid) + "|"]
    for stage in stages:
        t = tables[stage]
        lines += [f"| {stage} | {model_label(stage, m)} | " + " | ".join(cell(v) for v in row) + " |"
                  for m, row in zip(t["models"], t["all"])]
    by_surrogate = [s for s in stages if tables[s].get("all_by_surrogate")]
    if by_surrogate:
        lines += ["", "The mixture per surrogate ensemble (correct under every set crafted on it at that ε):", "",
                  "| Stage | Surrogate | " + " | ".join(f"ε={format_eps(e)}" for e in eps_grid) + " |",
                  "|---|---" + "|---:" * len(eps_grid) + "|"]
        for stage in by_surrogate:
            t = tables[stage]
            m = t["models"].index("mixture")
            lines += [f"| {stage} | {name} | " + " | ".join(cell(v) for v in rows[m]) + " |"
                      for name, rows in t["all_by_surrogate"].items()]
    for k, eps in enumerate(eps_grid):
        columns = [j for j, s in enumerate(first["sets"]) if s["eps"] == eps]
        labels = [set_label(first["sets"][j]) for j in columns]
        lines += ["", f"### Black-box transfer at ε={format_eps(eps)}", "",
                  "| Stage | Model | " + " | ".join(labels) + " | all |", "|---|---" + "|---:" * (len(columns) + 1) + "|"]
        for sur in protocol.get("surrogates", []):
            own = {(s["surrogate"], s["attack"], s["loss"], s["eps"]): v for s, v in zip(sur["sets"], sur["own_accuracy"])}
            keys = [tuple(first["sets"][j].values()) for j in columns]
            lines.append(f"| surrogate {sur['name']} | Mixture (white-box) | " + " | ".join(
                cell(own[key]) if key in own else "" for key in keys) + " | |")
        for stage in stages:
            t = tables[stage]
            lines += [f"| {stage} | {model_label(stage, m)} | " + " | ".join(cell(acc[j]) for j in columns)
                      + f" | {cell(every[k])} |" for m, acc, every in zip(t["models"], t["accuracy"], t["all"])]
    return [*lines, ""]


def evaluation_markdown(results: dict) -> str:
    """The sections `dvtrain eval` adds to results.md after the white-box tables (empty when it has not
    run); plots are linked by their path under the run directory, as results["plots"] records them."""
    if not any(key in results for key in ("transfer", "blackbox", "eps_sweep", "diversity")):
        return ""
    plots = results.get("plots", {})
    out = []
    for stage in stage_order(results.get("transfer", {})):
        m = results["transfer"][stage]
        off = mean_off_diagonal(m)
        out += [f"## Transferability: {stage}", "",
                f"PGD-L∞ ε={format_eps(m['eps'])}, {m['steps']} steps, {counted(m['restarts'], 'restart')}, crafted on the row's "
                f"submodel; success rate (%) on the column's model, over {m['n_images']} test images every submodel "
                f"classifies correctly. Mean off-diagonal success: {cell(off)}%.", "",
                *_matrix_markdown(stage, m["sources"], m["targets"], m["success"]), ""]
        if "transfer" in plots.get(stage, {}):
            out += [f"![transferability {stage}]({plots[stage]['transfer']})", ""]
    if results.get("blackbox"):
        out += _blackbox_markdown(results)
        if "blackbox" in plots.get(stage_order(results["blackbox"])[0], {}):
            out += [f"![black-box transfer, all]({plots[stage_order(results['blackbox'])[0]]['blackbox']})", ""]
    for stage in stage_order(results.get("eps_sweep", {})):
        out += _sweep_markdown(stage, results["eps_sweep"][stage])
        if "eps_sweep" in plots.get(stage, {}):
            out += [f"![accuracy vs ε {stage}]({plots[stage]['eps_sweep']})", ""]
    out += _diversity_markdown(results.get("diversity", {}))
    return "\n".join(out)


def _sweep_markdown(stage: str, s: dict) -> list[str]:
    """Accuracy against ε (`dvtrain.eval.sweep`): the worst case per model, then each attack per model;
    a results.json of dvtrain before the worst case (PGD only, "accuracy") as it was."""
    columns = [f"ε={format_eps(e)}" for e in s["eps"]]
    budget = f"{s['steps']} steps of {s['step_fraction']:g}·ε, {counted(s['restarts'], 'restart')}, {s['n_images']} test images"
    if "worst_case" not in s:
        return [f"## Accuracy vs ε: {stage}", "", f"White-box PGD-L∞, {budget}.", "",
                *_matrix_markdown(stage, s["models"], columns, s["accuracy"]), ""]
    out = [f"## Accuracy vs ε: {stage}", "",
           f"Robust accuracy (%) under white-box L∞ attacks, PGD with {budget} (the black-box table's images); "
           "worst case: per image, correct clean and under every attack run on that model at that ε "
           f"(submodels: {', '.join(attack_header(a) for a in s['of'][s['models'][0]])}; "
           f"mixture: {', '.join(attack_header(a) for a in s['of']['mixture'])}).", "",
           "Worst case:", "", *_matrix_markdown(stage, s["models"], columns, s["worst_case"]), ""]
    for attack, table in s["attacks"].items():
        ran = [(m, row) for m, row in zip(s["models"], table) if any(v is not None for v in row)]
        out += [f"{attack_header(attack)}:", "", *_matrix_markdown(stage, [m for m, _ in ran], columns,
                                                                     [row for _, row in ran]), ""]
    return out


def _diversity_markdown(entries: dict[str, dict]) -> list[str]:
    """One section per stage: the vulnerability-diversity matrix (dvtrain.eval.diversity) and its heat map."""
    out = []
    for stage in stage_order(entries):
        d = entries[stage]
        p = d["protocol"]
        out += [f"## Vulnerability diversity: {stage}", "",
                f"Mean cross-entropy (nats) of the column's submodel on images distilled on the row's submodel, "
                f"with the target images' labels (small: shared vulnerability); {d['n_images']} test-image pairs "
                f"every submodel classifies correctly, batches of {p['batch_size']}, "
                f"{'layer ' + str(p['layer']) if p['layer'] else 'a random layer per batch'}, distillation "
                f"ε={format_eps(p['eps'])}, {p['steps']} steps of {p['step_size']:g}, models in eval mode.", ""]
        if d["matrix"] is None:
            out += ["No test image is classified correctly by every submodel: nothing to measure.", ""]
            continue
        out += [*_matrix_markdown(stage, d["models"], d["models"], d["matrix"]), ""]
        if "plot" in d:
            out += [f"![vulnerability diversity {stage}]({d['plot']})", ""]
    return out
