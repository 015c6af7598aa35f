"""PNG figures of an evaluation: the transferability heat map, accuracy against ε, and run comparisons.

Drawn in the one style of `dvtrain.figure_style` (sizes, DPI, colours, layout checks, whole-then-rename
writes). Each figure says what it shows without the code: the attack, ε, budget and images in its
title, which way is better on its value axis. Every function that writes returns the path it wrote.
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from dvtrain import figure_style as style
from dvtrain import rundir
from dvtrain.eval.report import NOT_COMPARABLE, attack_header, counted, format_eps, model_label

PLOTS_DIR = rundir.PLOTS
BAR_HEIGHT_INCHES = 4.5  # the transfer chart
BAR_ROW_INCHES, BAR_TITLES_INCHES = 3.4, 1.4  # the accuracy chart: per row of panels; its title and legend
BAR_GROUP_INCHES = 1.0  # width per bar group (column) of a comparison chart: "Worst L∞" fits, unturned
BAR_SPAN = 0.8  # of a group's width, the part its bars fill
LEGEND_COLUMNS = 3  # runs per row of a comparison chart's legend, below the axes
DARK_CELL = 60.0  # cells above this success rate get white text
LARGE_TEXT = 0.7  # a figure title's characters per line, relative to the small font's
TITLE_WIDTH = 72  # characters per line of a figure's basis line (the "small" font at LINE_FIGSIZE's width)


def _display(name: str) -> str:
    """sub0 → Submodel 1, mixture → Mixture: the names of the results tables."""
    return model_label("", name)


def transfer_basis(matrix: dict) -> str:
    """What a transferability matrix measured, in one line: attack, ε, budget and images."""
    return (f"PGD-L∞ ε={format_eps(matrix['eps'])}, {matrix['steps']} steps of {matrix['step_fraction']:g}·ε, "
            f"{counted(matrix['restarts'], 'restart')}, on {matrix['n_images']} test images every submodel "
            "classifies correctly")


def transfer_heatmap(matrix: dict, title: str, path: Path) -> Path:
    """Success rate (%) of examples crafted on the row's submodel against the column's model (0–100 %, the
    same colour scale for every stage), titled `title` over the matrix's basis (`transfer_basis`)."""
    rows, cols = matrix["sources"], matrix["targets"]
    values = [[float("nan") if v is None else v for v in row] for row in matrix["success"]]
    width, height = style.heatmap_size(len(rows), len(cols))
    fig = style.new_figure(width, height)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap=style.SUCCESS_COLORS, vmin=style.PERCENT_RANGE[0], vmax=style.PERCENT_RANGE[1])
    ax.set_xticks(range(len(cols)), [_display(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_display(r) for r in rows])
    ax.set_xlabel("target model")
    ax.set_ylabel("source submodel (crafted on)")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if v != v else f"{v:.1f}", ha="center", va="center",
                    color="white" if v == v and v > DARK_CELL else "black")
    fig.colorbar(image, ax=ax, label="attack success (%)\noff-diagonal: lower is better")
    fig.suptitle(title)
    ax.set_title(wrap(transfer_basis(matrix), width), fontsize=style.SMALL)
    return style.save(fig, path)


def wrap(text: str, width_inches: float) -> str:
    """`text` broken into lines that fit a figure `width_inches` wide in the style's small font."""
    return "\n".join(textwrap.wrap(text, max(20, round(TITLE_WIDTH * width_inches / style.LINE_FIGSIZE[0]))))


def sweep_basis(sweep: dict) -> str:
    """What an ε sweep measured (`dvtrain.eval.sweep`), in one line: attacks, budget, images."""
    budget = (f"{sweep['steps']} steps of {sweep['step_fraction']:g}·ε, {counted(sweep['restarts'], 'restart')}"
              if "steps" in sweep else "")
    of = sweep.get("of", {}).get("mixture")
    attacks = f"worst case per image over {', '.join(attack_header(a) for a in of)}" if of else "PGD"
    return f"White-box L∞, {attacks}; {budget}; {sweep['n_images']} test images (the black-box protocol's)"


def eps_sweep_figure(sweep: dict, title: str) -> Figure:
    """Accuracy (%) against ε: per model the worst case over the sweep's attacks (`dvtrain.eval.sweep`; the
    mixture thick, submodels thin), and the mixture under each attack alone, dashed; titled `title` over
    the sweep's basis (`sweep_basis`). A results.json of dvtrain before the worst case (one attack,
    "accuracy") draws that attack's curves."""
    fig = style.new_figure(*style.LINE_FIGSIZE)
    ax = fig.add_subplot()
    worst = sweep.get("worst_case", sweep.get("accuracy"))
    for name, accuracy in zip(sweep["models"], worst):
        ax.plot(sweep["eps"], _nan(accuracy), marker="o", label=f"{_display(name)}, worst case" if "worst_case" in sweep
                else _display(name), linewidth=style.MIXTURE_LINE_WIDTH if name == "mixture" else style.LINE_WIDTH)
    mixture = sweep["models"].index("mixture")
    for attack, table in sweep.get("attacks", {}).items():
        if any(v is not None for v in table[mixture]):
            ax.plot(sweep["eps"], _nan(table[mixture]), linestyle="--", linewidth=style.LINE_WIDTH,
                    label=f"Mixture, {attack_header(attack)}")
    ax.set_xlabel("ε (L∞, pixels in [0, 1])")
    ax.set_ylabel(("robust accuracy (%)" if "worst_case" in sweep else "accuracy under PGD (%)") + ", higher is better")
    ax.set_ylim(*style.PERCENT_RANGE)
    ax.grid(alpha=style.GRID_ALPHA)
    fig.legend(loc="outside lower center", ncols=3, fontsize=style.SMALL)
    fig.suptitle(title)
    ax.set_title(wrap(sweep_basis(sweep), style.LINE_FIGSIZE[0]), fontsize=style.SMALL)
    return fig


def _nan(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def eps_sweep_plot(sweep: dict, title: str, path: Path) -> Path:
    """`eps_sweep_figure` written as PNG to `path`."""
    return style.save(eps_sweep_figure(sweep, title), path)


def _bars(ax, series: dict[str, dict[tuple[str, str], list[float]]], groups: list[tuple[str, str]],
          tick: list[str], marked: set[tuple[str, str, str]] = frozenset(),
          runs: dict[str, int] | None = None) -> tuple[int, int]:
    """One bar per run in each group: the mean, with the sample s.d. as an error bar where a run has
    several values (seeds); a run without a group's number leaves a gap; a (run, stage, column) in
    `marked` gets a † above its bar (another basis than its column's, as in the table), a bar of k values
    where the run has more seeds (`runs`) "n=k". Returns how many bars got a † and how many an "n=k"."""
    daggers = partial = 0
    runs = runs or {}
    width = BAR_SPAN / max(len(series), 1)
    for r, (run, values) in enumerate(series.items()):
        at = [(g, values[key]) for g, key in enumerate(groups) if key in values]
        if not at:  # nothing of this run here: no bar (its colour stays its own in every figure)
            continue
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in at]
        xs = [g + (r - (len(series) - 1) / 2) * width for g, _ in at]
        heights = [statistics.mean(v) for _, v in at]
        ax.bar(xs, heights, width=width, label=run, color=style.COLORS[r % len(style.COLORS)],
               yerr=spread if any(spread) else None, capsize=style.ERROR_CAP, error_kw={"elinewidth": style.LINE_WIDTH})
        for x, h, sd, (g, v) in zip(xs, heights, spread, at):
            dagger, fewer = (run, *groups[g]) in marked, len(v) < runs.get(run, len(v))
            if dagger or fewer:
                ax.annotate((f"n={len(v)}" if fewer else "") + (NOT_COMPARABLE if dagger else ""),
                            (x, min(h + sd, style.PERCENT_RANGE[1])), ha="center", va="bottom", annotation_clip=False,
                            fontsize=style.SMALL)
                daggers, partial = daggers + dagger, partial + fewer
    ax.set_xticks(range(len(groups)), tick)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylim(*style.PERCENT_RANGE)
    ax.grid(axis="y", alpha=style.GRID_ALPHA)
    return daggers, partial


def _pack(widths: list[int], capacity: int) -> list[list[int]]:
    """Panels (their widths in bar groups) in order into rows of at most `capacity` groups: the indices per row."""
    rows: list[list[int]] = [[]]
    for k, width in enumerate(widths):
        if rows[-1] and sum(widths[j] for j in rows[-1]) + width > capacity:
            rows.append([])
        rows[-1].append(k)
    return rows


def _legend(fig: Figure, series: dict, daggers: int, partial: int = 0) -> None:
    """Every run's colour once, below the axes (beside them it squeezed the bars), and what † and "n=k" mean."""
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    ordered = [run for run in series if run in handles]
    notes = [*([f"{NOT_COMPARABLE}: another basis than the rest of its column, as in the table"] if daggers else []),
             *(["n=k: the mean of only k of the row's runs"] if partial else [])]
    title = "run" + (f" ({'; '.join(notes)})" if notes else "")
    fig.legend([handles[r] for r in ordered], ordered, loc="outside lower center", title=title,
               ncols=min(LEGEND_COLUMNS, len(ordered)), fontsize=style.SMALL, title_fontsize=style.SMALL)


def comparison_plots(series: dict[str, dict[tuple[str, str], list[float]]], kinds: dict[str, str], stages: list[str],
                     path: Path, marked: set[tuple[str, str, str]] = frozenset(), separator: str = "_",
                     runs: dict[str, int] | None = None) -> list[Path]:
    """`dvtrain compare --plot FILE`: one PNG per kind of number, FILE's stem + _accuracy.png (one panel
    per stage, a bar group per accuracy column; a stage with more columns than a row of the maximum width
    holds is split over several panels, "stage (1/2)") and, where there are transfer numbers, + _transfer.png
    (transfer success, lower is better: a bar group per stage; one file per transfer column, + _transfer_eps<ε>.png
    where there are several, so none overwrites another). `series`: run → (stage, column) → the values of the
    run's seeds (mean drawn, s.d. as error bar); `kinds`: column → "accuracy" (in %) | "transfer" (success,
    in %), no other kind is drawn; `marked`: the (run, stage, column) bars that get a †; `runs`: a run's
    number of seeds (its group's size), where a bar over fewer of them is marked "n=k" (the table's "(n=k)").
    Each figure is titled with what it compares; the runs' legend is below the axes.
    """
    path = Path(path)
    written = []
    seeds = max((len(v) for values in series.values() for v in values.values()), default=1)
    spread = "; bars: mean over seeds, error bar: s.d." if seeds > 1 else ""
    accuracy = [c for c, k in kinds.items() if k == "accuracy"]
    capacity = int(style.MAX_WIDTH_INCHES // BAR_GROUP_INCHES)  # bar groups a row holds with their labels readable
    panels = []  # (stage, title, columns): a stage with more columns than a row holds is split over several panels
    for s in stages:
        own = [c for c in accuracy if any((s, c) in v for v in series.values())]
        parts = [own[start:start + capacity] for start in range(0, len(own), capacity)]
        panels += [(s, s if len(parts) == 1 else f"{s} ({k + 1}/{len(parts)})", part) for k, part in enumerate(parts)]
    if panels:
        widths = [len(columns) for *_, columns in panels]
        rows = _pack(widths, capacity)
        span = max(sum(widths[k] for k in row) for row in rows)
        fig = style.new_figure(max(style.LINE_FIGSIZE[0], BAR_GROUP_INCHES * span),
                               BAR_ROW_INCHES * len(rows) + BAR_TITLES_INCHES)
        grid = fig.add_gridspec(len(rows), span)
        axes, daggers, partial = [], 0, 0
        for r, row in enumerate(rows):
            start = 0
            for k in row:
                ax = fig.add_subplot(grid[r, start:start + widths[k]], sharey=axes[0] if axes else None)
                start += widths[k]
                stage, title, columns = panels[k]
                marks = _bars(ax, series, [(stage, c) for c in columns], [c.replace(" ε=", "\nε=") for c in columns],
                              marked, runs)
                daggers, partial = daggers + marks[0], partial + marks[1]
                ax.set_title(title)
                if start == widths[k]:  # the first panel of its row
                    ax.set_ylabel("accuracy (%), higher is better")
                else:
                    ax.tick_params(labelleft=False)
                axes.append(ax)
        _legend(fig, series, daggers, partial)
        fig.suptitle(f"Accuracy of each stage's mixture, run by run{spread}")
        written.append(style.save(fig, path.with_name(f"{path.stem}{separator}accuracy.png")))
    transfer = [c for c, k in kinds.items() if k == "transfer"]
    for column in transfer:  # in practice one: the mean off-diagonal success at one ε
        own = [s for s in stages if any((s, column) in v for v in series.values())]
        if not own:
            continue
        fig = style.new_figure(max(style.LINE_FIGSIZE[0], BAR_GROUP_INCHES * len(own)), BAR_HEIGHT_INCHES)
        ax = fig.add_subplot()
        daggers, partial = _bars(ax, series, [(s, column) for s in own], own, marked, runs)
        ax.set_ylabel("transfer success (%), lower is better")
        fig.suptitle(wrap(f"{column.replace('↓', '').strip()}: mean success of PGD crafted on one submodel against "
                          f"each other submodel{spread}", fig.get_figwidth() * LARGE_TEXT))
        _legend(fig, series, daggers, partial)
        eps = column.partition(" ε=")[2]
        kind = "transfer" if len(transfer) == 1 or not eps else f"transfer_eps{eps.replace('/', 'over')}"
        written.append(style.save(fig, path.with_name(f"{path.stem}{separator}{kind}.png")))
    return written
