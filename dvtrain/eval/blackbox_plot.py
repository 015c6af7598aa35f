"""The paper's curves (Yang et al., NeurIPS 2020, Fig. 4 style), one line per stage so that DVERGE can be
read against vanilla and the baselines on identical examples:

- `blackbox_all.png`: the mixture's black-box accuracy against ε: with several surrogate ensembles one
  panel per ensemble (correct under every example set crafted on it at that ε), then one for all of
  them (every set at that ε); with one ensemble that one panel only (the two would be the same);
- `whitebox_worst_case.png`: the mixture's worst case over the ε sweep's white-box attacks against ε, on
  the sweep's images, and as separate stars the white-box table's worst case (its own attacks and
  images), each labelled with its basis: the two are never joined into one curve.

Each point has its 95 % Wilson interval as an error bar. Drawn in `dvtrain.figure_style` from the merged
results.json, so stages evaluated by separate `dvtrain eval` runs share the figures.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dvtrain import figure_style as style
from dvtrain.eval.attacks.transfer import TRANSFER_ATTACKS
from dvtrain.eval.blackbox import ALL_BY_SURROGATE, ALL_SETS, LOSS_NAMES, MIXTURE
from dvtrain.eval.plots import sweep_basis, wrap
from dvtrain.eval.report import (EVAL_TABLE, WORST_CASE, attack_header, blackbox_protocol, counted, format_eps,
                                 stage_order)
from dvtrain.eval.stats import PERCENT, wilson_interval

PLOTS_DIR = "plots"  # as dvtrain.eval.plots writes them
FILE = "blackbox_all.png"
WHITEBOX_FILE = "whitebox_worst_case.png"
KIND, WHITEBOX_KIND = "blackbox", "whitebox_worst_case"  # keys under results["plots"][stage]
EPS_LABEL = "ε (L∞, pixels in [0, 1])"
ACCURACY_LABEL = "mixture accuracy (%), higher is better"
TABLE_MARKER = "*"  # the white-box table's worst case, apart from the sweep's curve
TABLE_MARKER_SIZE = 12
LEGEND_COLUMNS = 3
LEGEND_INCHES = 1.0  # below the panels: the stages' legend and the figure's title


def _curve(ax: Axes, eps: list[float], values: list[float | None], n: int, label: str, color: str) -> None:
    """One stage's line with Wilson error bars (values in percent measured on n images)."""
    points = [(e, v) for e, v in zip(eps, values) if v is not None]
    if not points:
        return
    xs, ys = zip(*points)
    bounds = [wilson_interval(v / PERCENT * n, n) for v in ys]
    errors = [[y - low for y, (low, _) in zip(ys, bounds)], [high - y for y, (_, high) in zip(ys, bounds)]]
    ax.errorbar(xs, ys, yerr=errors, marker="o", markersize=4, capsize=style.ERROR_CAP, label=label, color=color)


def _panels(titles: list[str]) -> tuple[Figure, list[Axes]]:
    """A grid of panels (at most style.PANEL_COLUMNS a row) sharing the accuracy axis, one per title."""
    rows, columns = style.panel_grid(len(titles))
    panel = style.LINE_FIGSIZE if len(titles) == 1 else style.PANEL_INCHES
    fig = style.new_figure(panel[0] * columns, panel[1] * rows + LEGEND_INCHES)
    grid = fig.subplots(rows, columns, squeeze=False, sharey=True)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(titles):]:
        ax.remove()
    for k, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title)
        ax.set_xlabel(EPS_LABEL)
        if k % columns == 0:
            ax.set_ylabel(ACCURACY_LABEL)
        ax.set_ylim(*style.PERCENT_RANGE)
        ax.grid(alpha=style.GRID_ALPHA)
    return fig, axes[: len(titles)]


def _legend(fig: Figure, axes: list[Axes], title: str | None = None) -> None:
    """Each label once, below the panels, under `title` (the figure's basis, read as a caption)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=style.SMALL,
               ncols=min(LEGEND_COLUMNS, len(handles)), title=title, title_fontsize=style.SMALL)


def _ensemble(name: str, protocol: dict) -> str:
    """A surrogate ensemble in words: "ens3" → "surrogate ensemble of 3 models"."""
    sizes = {s["name"]: s["size"] for s in protocol.get("surrogates", [])}
    size = sizes.get(name, name.removeprefix("ens"))
    return f"surrogate ensemble of {size} models"


def blackbox_basis(tables: dict[str, dict], protocols: dict[str, dict]) -> str:
    """The attacks, budget and images of the black-box tables, in one line (stages on other bases each named)."""
    def basis(stage: str) -> str:
        table, protocol = tables[stage], protocols.get(stage, {})
        attacks = list(dict.fromkeys(s["attack"] for s in table.get("sets", [])))
        losses = list(dict.fromkeys(s["loss"] for s in table.get("sets", [])))
        named = ", ".join(TRANSFER_ATTACKS[a].label if a in TRANSFER_ATTACKS else a for a in attacks) or "transfer attacks"
        parts = [named + (f" with {' and '.join(LOSS_NAMES.get(x, x) for x in losses)} loss" if losses else "")]
        if "steps" in protocol:
            parts.append(f"{protocol['steps']} steps, {counted(protocol['restarts'], 'run')} each")
        parts.append(f"{table['n_images']} test images")
        return ", ".join(parts)

    bases = {stage: basis(stage) for stage in tables}
    if len(set(bases.values())) == 1:
        return next(iter(bases.values()))
    return "; ".join(f"{stage}: {b}" for stage, b in bases.items())


def blackbox_plot(tables: dict[str, dict], order: list[str], path: Path,
                  protocols: dict[str, dict] | None = None) -> Path | None:
    """The mixture's black-box accuracy (%) against ε: with several surrogate ensembles one panel per
    ensemble, then "all"; with one, its panel only. One line per stage of `order` that has a table with
    the ε sweep; `protocols`: stage → its table's protocol (`report.blackbox_protocol`), for the
    ensembles' sizes and the attacks' budget in the titles. None when no table has the ε sweep."""
    tables = {stage: tables[stage] for stage in order if stage in tables and ALL_SETS in tables[stage]}
    if not tables:
        return None
    protocols = protocols or {}
    surrogates = list(dict.fromkeys(name for t in tables.values() for name in t.get(ALL_BY_SURROGATE, {})))
    first = protocols.get(next(iter(tables)), {})
    if len(surrogates) > 1:
        titles = [_ensemble(name, first) for name in surrogates] + [f"all {len(surrogates)} surrogate ensembles"]
    else:
        titles = [_ensemble(surrogates[0], first) if surrogates else "all transfer attacks"]
        surrogates = []  # its own panel would repeat the "all" panel
    fig, axes = _panels(titles)
    for k, (stage, table) in enumerate(tables.items()):
        m, color = table["models"].index(MIXTURE), style.COLORS[k % len(style.COLORS)]
        for ax, name in zip(axes, surrogates):
            if name in table.get(ALL_BY_SURROGATE, {}):
                _curve(ax, table["eps"], table[ALL_BY_SURROGATE][name][m], table["n_images"], stage, color)
        _curve(axes[-1], table["eps"], table[ALL_SETS][m], table["n_images"], stage, color)
    _legend(fig, axes, wrap(blackbox_basis(tables, protocols), fig.get_figwidth()))
    fig.suptitle("Black-box transfer: the mixture correct under every example set at ε")
    return style.save(fig, path)


def table_worst_cases(rows: list[dict]) -> dict[str, list[dict]]:
    """Per stage, the white-box table's (`dvtrain eval`'s) L∞ worst-case rows of the mixture, one per ε."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        if (row.get("table") == EVAL_TABLE and row.get("model") == MIXTURE and row.get("attack") == WORST_CASE
                and row.get("norm") == "Linf"):
            out.setdefault(row["stage"], []).append(row)
    return out


def _table_basis(rows: list[dict]) -> str:
    of = ", ".join(attack_header(a) for a in rows[0].get("of", []))
    return f"worst case per image over {of}; {rows[0]['n']} test images" if of else f"{rows[0]['n']} test images"


def whitebox_plot(sweeps: dict[str, dict], order: list[str], path: Path,
                  table: dict[str, list[dict]] | None = None) -> Path | None:
    """The mixture's white-box worst case (%) over the ε sweep's attacks against ε, one line per stage of
    `order`, its attacks, budget and images in the title; `table`: stage → the white-box table's worst-case
    rows of the mixture (`table_worst_cases`), drawn as stars with their intervals and their own basis in
    the legend. None without sweeps."""
    sweeps = {stage: sweeps[stage] for stage in order if stage in sweeps}
    if not sweeps:
        return None
    table = {stage: rows for stage, rows in (table or {}).items() if stage in sweeps}
    bases = {stage: sweep_basis(sweep) for stage, sweep in sweeps.items()}
    table_bases = {stage: _table_basis(rows) for stage, rows in table.items()}
    one_basis, one_table_basis = len(set(bases.values())) == 1, len(set(table_bases.values())) <= 1
    lines = ["lines (ε sweep): " + (next(iter(bases.values())) if one_basis else "each stage's basis in the legend")]
    if table:
        eps = sorted({r["eps"] for rows in table.values() for r in rows})
        lines.append(f"stars (white-box table, ε={', '.join(format_eps(e) for e in eps)}): "
                     + (next(iter(table_bases.values())) if one_table_basis else "each stage's basis in the legend"))
    fig, (ax,) = _panels(["\n".join(wrap(line, style.LINE_FIGSIZE[0]) for line in lines)])
    ax.title.set_fontsize(style.SMALL)
    for k, (stage, sweep) in enumerate(sweeps.items()):
        color = style.COLORS[k % len(style.COLORS)]
        label = f"{stage}, ε sweep" + ("" if one_basis else f" ({bases[stage]})")
        _curve(ax, sweep["eps"], sweep["worst_case"][sweep["models"].index(MIXTURE)], sweep["n_images"], label, color)
        for row in table.get(stage, []):
            ax.errorbar([row["eps"]], [row["accuracy"]],
                        yerr=[[row["accuracy"] - row["ci_low"]], [row["ci_high"] - row["accuracy"]]],
                        marker=TABLE_MARKER, markersize=TABLE_MARKER_SIZE, linestyle="none", capsize=style.ERROR_CAP,
                        color=color, markeredgecolor="black",
                        label=f"{stage}, white-box table" + ("" if one_table_basis else f" ({table_bases[stage]})"))
    _legend(fig, [ax])
    fig.suptitle("Mixture's white-box worst case vs ε")
    return style.save(fig, path)


def add_blackbox_plot(run_dir: Path, results: dict, trained: list[str] | tuple[str, ...] = ()) -> None:
    """Draw both figures under RUN_DIR/plots/ from `results` (results.json as merged: every evaluated
    stage, in training order `trained`) and record them in results["plots"][stage] for each stage drawn."""
    order = stage_order(set(results.get("blackbox", {})) | set(results.get("eps_sweep", {})), trained)
    plots = results.setdefault("plots", {})
    tables = results.get("blackbox", {})
    protocols = {stage: blackbox_protocol(results, stage) for stage in tables}
    drawn = blackbox_plot(tables, order, Path(run_dir) / PLOTS_DIR / FILE, protocols)
    if drawn is not None:
        for stage in (s for s in tables if ALL_SETS in tables[s]):  # older tables without the ε sweep are not drawn
            plots.setdefault(stage, {})[KIND] = drawn.relative_to(run_dir).as_posix()
    drawn = whitebox_plot(results.get("eps_sweep", {}), order, Path(run_dir) / PLOTS_DIR / WHITEBOX_FILE,
                          table_worst_cases(results.get("eval", [])))
    if drawn is not None:
        for stage in results.get("eps_sweep", {}):
            plots.setdefault(stage, {})[WHITEBOX_KIND] = drawn.relative_to(run_dir).as_posix()
