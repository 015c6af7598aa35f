"""Results I/O, the one place that reads and writes a run's results.json and results.md.

results.json holds "eval" (white-box rows, see `dvtrain.eval.whitebox`), "stages" (training time per
stage, written by the training loop), and what `dvtrain eval` adds: "checks" (gradient-masking
verdicts per stage), "transfer", "blackbox", "blackbox_surrogate", "eps_sweep", "plots". Both files
are written atomically (a temporary file renamed over the old one), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from dvtrain.config import STAGES, WHITEBOX_ATTACKS, Config
from dvtrain.eval.transfer import mean_off_diagonal

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FULL_EVALUATION_KEYS = ("transfer", "blackbox", "eps_sweep", "checks")  # per-stage keys only `dvtrain eval` writes
WORST_CASE = "worst_case"
NORM_SUFFIXED = ("autoattack", WORST_CASE)  # attacks whose name does not say the norm: metric names add it
BLACKBOX_PREFIX = "bb_"
BLACKBOX_ATTACKS = ("mi_pgd", "m_di2_fgsm", "all")
TRANSFER_OFFDIAG = "transfer_offdiag"
_HEADERS = {"clean": "Clean", "fgsm": "FGSM", "pgd_linf": "PGD", "pgd_l2": "PGD", "pgd_linf_margin": "PGD margin",
            "pgd_l2_margin": "PGD margin", "pgd_linf_dlr": "PGD DLR", "pgd_l2_dlr": "PGD DLR", "autoattack": "AutoAttack",
            "adaptive": "Adaptive", WORST_CASE: "**Worst case**"}
_NORM_SYMBOL = {"Linf": "L∞", "L2": "L2"}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_results(run_dir: Path) -> dict:
    """results.json of a run, or an empty one ({"eval": [], "stages": {}}) if there is none yet."""
    path = Path(run_dir) / RESULTS_JSON
    if path.is_file():
        return json.loads(path.read_text())
    return {"eval": [], "stages": {}}


def save_results(run_dir: Path, cfg: Config, results: dict) -> None:
    """Write results.json and results.md (call it on the main process only)."""
    run_dir = Path(run_dir)
    results["run"] = cfg.name
    write_atomic(run_dir / RESULTS_JSON, json.dumps(results, indent=1))
    header = f"# dvtrain results: {cfg.name}\n\ndata: {cfg.data.name}, model: {cfg.model.arch} ×{cfg.ensemble.size}\n\n"
    epochs = "".join(
        f"- {stage}: {info['epochs']} epochs, {info['train_s']:.0f} s training\n"
        for stage, info in results["stages"].items()
    )
    tables = results_markdown(results["eval"], results.get("checks", {})) + evaluation_markdown(results)
    write_atomic(run_dir / RESULTS_MD, header + epochs + "\n" + tables)


# ----------------------------------------------------------------------------- names and numbers


def metric_name(attack: str, norm: str | None) -> str:
    """A row's metric name: the attack, with the norm added where the name does not say it
    (autoattack_linf, worst_case_l2); what W&B summaries and `dvtrain compare` use."""
    return f"{attack}_{norm.lower()}" if attack in NORM_SUFFIXED and norm else attack


METRIC_ORDER = (
    *(metric_name(WORST_CASE, n) for n in ("Linf", "L2")),
    *(m for a in WHITEBOX_ATTACKS for m in ([metric_name(a, n) for n in ("Linf", "L2")] if a in NORM_SUFFIXED else [a])),
    *(BLACKBOX_PREFIX + a for a in BLACKBOX_ATTACKS),
    TRANSFER_OFFDIAG,
)


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


def stage_order(stages) -> list[str]:
    return sorted(stages, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))


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


def results_markdown(rows: list[dict], checks: dict[str, list[str]] | None = None) -> str:
    """One table per stage, in order of first appearance: a row per model, a column per (attack, norm),
    the worst cases right after the clean column; then the stage's gradient-masking check lines."""
    checks = checks or {}
    out = []
    for stage in dict.fromkeys(row["stage"] for row in rows):
        own = [r for r in rows if r["stage"] == stage]
        cells = {(r["model"], r["attack"], r.get("norm")): r for r in own}
        columns = list(dict.fromkeys((r["attack"], r.get("norm"), r["eps"]) for r in own))
        columns.sort(key=lambda c: (c[0] != "clean", c[0] != WORST_CASE))
        models = list(dict.fromkeys(r["model"] for r in own))
        sizes = sorted({r["n"] for r in own if "n" in r})
        seeds = max((len(r.get("seed_accuracies", [])) for r in own), default=0)
        note = (f"n = {', '.join(map(str, sizes))} test images; accuracy (%) with its 95 % Wilson interval"
                + (f"; ± s.d. over {seeds} seeds of the randomised attacks" if seeds > 1 else "")
                + "; worst case: images that survive every attack of that norm.") if sizes else ""
        lines = [f"### {stage}", "", *([note, ""] if note else []),
                 "| Model | " + " | ".join(_column_label(*c) for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
        for model in models:
            lines.append("| " + " | ".join([model_label(stage, model),
                                            *(_accuracy_cell(cells.get((model, a, n))) for a, n, _ in columns)]) + " |")
        if checks.get(stage):
            lines += ["", *(f"- {line}" for line in checks[stage])]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


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
    if not any(key in results for key in ("transfer", "blackbox", "eps_sweep")):
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
        s = results["eps_sweep"][stage]
        out += [f"## Accuracy vs ε: {stage}", "",
                f"White-box PGD-L∞, {s['steps']} steps of {s['step_fraction']:g}·ε, {s['restarts']} restarts, "
                f"{s['n_images']} test images.", "",
                *_matrix_markdown(stage, s["models"], [f"ε={format_eps(e)}" for e in s["eps"]], s["accuracy"]), ""]
        if "eps_sweep" in plots.get(stage, {}):
            out += [f"![accuracy vs ε {stage}]({plots[stage]['eps_sweep']})", ""]
    return "\n".join(out)
