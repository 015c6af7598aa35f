"""Results I/O, the one place that reads and writes a run's results.json and results.md.

results.json holds "eval" (white-box rows, see `dvtrain.eval.whitebox`), "stages" (training time per
stage, written by the training loop), and what `dvtrain eval` adds: "checks" (gradient-masking
verdicts per stage), "transfer", "blackbox", "blackbox_surrogate", "eps_sweep", "plots". Both files
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

from dvtrain import rundir, storage
from collections.abc import Callable

from dvtrain.config import STAGES, Config
from dvtrain.eval.attack_registry import ATTACKS, EACH_AUTOATTACK_NORM
from dvtrain.rundir import RunDir

RESULTS_JSON = rundir.RESULTS_JSON
RESULTS_MD = rundir.RESULTS_MD
TRAIN_TABLE, EVAL_TABLE = "train", "eval"  # the row field "table": which command produced the row
ROW_KEY = ("table", "stage", "model", "attack", "norm", "eps", "budget")  # one row per key in results.json
FULL_EVALUATION_KEYS = ("transfer", "blackbox", "eps_sweep", "checks", "diversity")  # per-stage keys only `dvtrain eval` writes
WORST_CASE = "worst_case"
# Attacks whose name does not say the norm (they run at several): metric names add it.
NORM_SUFFIXED = (*(name for name, a in ATTACKS.items() if a.norm == EACH_AUTOATTACK_NORM), WORST_CASE)
BLACKBOX_PREFIX = "bb_"
BLACKBOX_ATTACKS = ("mi_pgd", "m_di2_fgsm", "all")
TRANSFER_OFFDIAG = "transfer_offdiag"
_HEADERS = {name: a.header for name, a in ATTACKS.items()} | {WORST_CASE: "**Worst case**"}
_NORM_SYMBOL = {"Linf": "L∞", "L2": "L2"}


def write_atomic(path: Path, text: str) -> None:
    storage.write_atomic(path, text)


def load_results(run_dir: Path) -> dict:
    """results.json of a run, or an empty one ({"eval": [], "stages": {}}) if there is none yet."""
    path = RunDir(run_dir).results_json
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("eval", [])
    results.setdefault("stages", {})
    return results


def save_results(run_dir: Path, cfg: Config, results: dict) -> None:
    """Write results.json and results.md as `results` holds them (call it on the main process only,
    holding `RunDir.lock()`; `update_results` does both)."""
    run = RunDir(run_dir)
    results["run"] = cfg.name
    write_atomic(run.results_json, json.dumps(results, indent=1))
    header = f"# dvtrain results: {cfg.name}\n\ndata: {cfg.data.name}, model: {cfg.model.arch} ×{cfg.ensemble.size}\n\n"
    order = stage_order(results["stages"], cfg.stages)
    epochs = "".join(
        f"- {stage}: {results['stages'][stage]['epochs']} epochs, {results['stages'][stage]['train_s']:.0f} s training\n"
        for stage in order
    )
    tables = results_markdown(results["eval"], results.get("checks", {}), cfg.stages) + evaluation_markdown(results)
    write_atomic(run.results_md, header + epochs + "\n" + tables)


def row_key(row: dict) -> tuple:
    """A white-box row's identity in the store (`ROW_KEY`); rows of older dvtrain releases have no table
    or budget (None)."""
    return tuple(row.get(field) for field in ROW_KEY)


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """`existing` with every row whose key a `new` row has replaced by it, the new rows last (newest)."""
    replaced = {row_key(r) for r in new}
    return [r for r in existing if row_key(r) not in replaced] + list(new)


def update_results(run_dir: Path, cfg: Config, change: Callable[[dict], None]) -> dict:
    """Read results.json, apply `change(results)` to it in place, write results.json and results.md;
    all under the run directory's inter-process lock, so concurrent writers never lose each other's
    rows. Returns the results as written (main process only)."""
    with RunDir(run_dir).lock():
        results = load_results(run_dir)
        change(results)
        save_results(run_dir, cfg, results)
    return results


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


def _blackbox_markdown(tables: dict[str, dict], protocol: dict) -> list[str]:
    """The black-box section (`dvtrain.eval.blackbox`): "all" per ε for every stage and model, then one
    detailed table per ε (a column per surrogate ensemble × attack × loss), the surrogates' own rows first."""
    from dvtrain.eval.blackbox import set_label

    stages = [s for s in stage_order(tables) if "all" in tables[s]]
    if not stages:
        return []
    eps_grid = tables[stages[0]]["eps"]
    sizes = ", ".join(str(s["size"]) for s in protocol["surrogates"])
    lines = ["## Black-box transfer", "",
             f"Accuracy (%) on {protocol['n_images']} test images (seed {protocol['seed']}) under transfer examples "
             f"crafted on hold-out plain ensembles of {sizes} models of this architecture with momentum PGD "
             f"({protocol['restarts']} random starts), M-DI²-FGSM (p {protocol['di_prob']:g}) and SGM (γ {protocol['sgm_gamma']:g}), "
             f"{protocol['steps']} steps each, losses {', '.join(l.upper() for l in protocol['losses'])}. A set counts an image correct "
             "only under all its runs; \"all\": correct under every set at that ε. Example sets and surrogates are "
             f"shared by every run on the same data ({protocol['cache']}).", "",
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
        columns = [j for j, s in enumerate(tables[stages[0]]["sets"]) if s["eps"] == eps]
        labels = [set_label(tables[stages[0]]["sets"][j]) for j in columns]
        lines += ["", f"### Black-box transfer at ε={format_eps(eps)}", "",
                  "| Stage | Model | " + " | ".join(labels) + " | all |", "|---|---" + "|---:" * (len(columns) + 1) + "|"]
        for sur in protocol["surrogates"]:
            own = {(s["surrogate"], s["attack"], s["loss"], s["eps"]): v for s, v in zip(sur["sets"], sur["own_accuracy"])}
            keys = [tuple(tables[stages[0]]["sets"][j].values()) for j in columns]
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
                f"PGD-L∞ ε={format_eps(m['eps'])}, {m['steps']} steps, {m['restarts']} restarts, crafted on the row's "
                f"submodel; success rate (%) on the column's model, over {m['n_images']} test images every submodel "
                f"classifies correctly. Mean off-diagonal success: {cell(off)}%.", "",
                *_matrix_markdown(stage, m["sources"], m["targets"], m["success"]), ""]
        if "transfer" in plots.get(stage, {}):
            out += [f"![transferability {stage}]({plots[stage]['transfer']})", ""]
    if results.get("blackbox"):
        out += _blackbox_markdown(results["blackbox"], results["blackbox_surrogate"])
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
    budget = f"{s['steps']} steps of {s['step_fraction']:g}·ε, {s['restarts']} restarts, {s['n_images']} test images"
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
