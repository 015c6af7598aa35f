"""One look for every PNG dvtrain draws (evaluation, comparison, training curves), and the checks that
keep a figure readable without the code.

Sizes are in inches at `DPI`: no figure is wider than `MAX_WIDTH_INCHES` (960 px), so a figure shown at
a page's width (GitHub's column is about 900 px) keeps its 10-pt text at about its own size. Figures
use matplotlib's object API on the Agg canvas (no pyplot, no display, no global state) with the
constrained layout engine, which makes room for titles, colour bars and legends.

`layout_problems` is what a reader would see: a text (title, axis or colour-bar label, tick label,
legend entry, value written in a cell) cut by the canvas's edge, two texts drawn over each other, or an
axes squeezed to a sliver. `save` first tries `fix_layout` (turn crowded x tick labels, then widen the
figure up to the maximum width) and writes the PNG whole-then-rename through `dvtrain.storage.replacing`.
This module imports matplotlib and the storage helper only, so eval/, report/ and train/ can all use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from dvtrain import storage

DPI = 120
MAX_WIDTH_INCHES = 8.0  # 960 px at DPI
LINE_FIGSIZE = (6.4, 4.8)  # one axes of lines against ε or epochs
PANEL_INCHES = (4.0, 3.4)  # one panel of a grid of such axes
PANEL_COLUMNS = 2  # panels per row: two keep a grid within MAX_WIDTH_INCHES
CELL_INCHES = 1.0  # heat-map cell: a "Submodel 3" tick label fits beside the next one, unturned
HEATMAP_MARGIN_INCHES = (1.8, 2.2)  # beside a heat map's cells: its y tick labels and label; above and below: titles, x ticks
COLORBAR_INCHES = 1.6  # room beside a heat map for its colour bar and its label


def heatmap_size(rows: int, columns: int) -> tuple[float, float]:
    """(width, height) in inches of a heat map of rows × columns cells with its colour bar."""
    return (CELL_INCHES * columns + HEATMAP_MARGIN_INCHES[0] + COLORBAR_INCHES,
            CELL_INCHES * rows + HEATMAP_MARGIN_INCHES[1])
SMALL = "small"  # legend and note font size (matplotlib's relative size: 0.833 of 10 pt)
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
PERCENT_RANGE = (0.0, 100.0)
SUCCESS_COLORS = "Reds"  # attack success (%): darker is more transfer, worse for the ensemble
DIVERSITY_COLORS = "Blues"  # cross-entropy (nats): darker is a larger loss
GRID_ALPHA = 0.3
LINE_WIDTH, MIXTURE_LINE_WIDTH = 1.0, 3.0
ERROR_CAP = 3  # points
TICK_ROTATION = 30  # degrees, for x tick labels too long to stand side by side
OVERLAP_PX = 1.0  # two texts whose boxes share more than this in both directions overlap
MIN_AXES_SHARE = 0.4  # an axes narrower than this share of its column of the figure is squeezed
WIDEN_STEP = 1.25  # `fix_layout` widens by this factor per try, up to MAX_WIDTH_INCHES


def new_figure(width: float, height: float) -> Figure:
    """An empty figure `width` × `height` inches (width capped at MAX_WIDTH_INCHES) on an Agg canvas
    with the constrained layout engine."""
    fig = Figure(figsize=(min(width, MAX_WIDTH_INCHES), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_grid(count: int) -> tuple[int, int]:
    """(rows, columns) of a grid of `count` panels, at most PANEL_COLUMNS a row."""
    columns = min(count, PANEL_COLUMNS)
    return -(-count // columns), columns


def _tick_label_visible(tick, label: Text, axis) -> bool:
    low, high = sorted(axis.get_view_interval())
    slack = (high - low) * 1e-6
    return label.get_visible() and bool(label.get_text()) and low - slack <= tick.get_loc() <= high + slack


def drawn_texts(fig: Figure) -> Iterator[tuple[Text, Bbox]]:
    """Every text the PNG shows, with its box in pixels: titles, labels, colour-bar labels, legend entries,
    annotations, and the tick labels of ticks inside their axis's view (matplotlib keeps labels of the
    others, undrawn). Draws the figure first, so the layout is the one `savefig` writes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks: dict[int, bool] = {}
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                for label in (tick.label1, tick.label2):
                    ticks[id(label)] = _tick_label_visible(tick, label, axis)
            offset = axis.get_offset_text()  # "1e-3" beside the ticks, when drawn
            ticks[id(offset)] = offset.get_visible() and bool(offset.get_text())
    for text in fig.findobj(Text):
        if id(text) in ticks:
            if not ticks[id(text)]:
                continue
        elif not (text.get_visible() and text.get_text()):
            continue
        yield text, text.get_window_extent(renderer)


def layout_problems(fig: Figure) -> list[str]:
    """What makes the figure hard to read, one line each (empty: none): a text reaching past the canvas, two
    texts overlapping by more than OVERLAP_PX, an axes narrower than MIN_AXES_SHARE of its column."""
    width, height = fig.canvas.get_width_height()
    canvas = Bbox.from_bounds(0, 0, width, height)
    texts = list(drawn_texts(fig))
    problems = []
    for text, box in texts:
        if box.x0 < -OVERLAP_PX or box.y0 < -OVERLAP_PX or box.x1 > canvas.x1 + OVERLAP_PX or box.y1 > canvas.y1 + OVERLAP_PX:
            problems.append(f"text {text.get_text()!r} reaches past the canvas ({_box(box)} on {width}×{height})")
    for k, (a, box_a) in enumerate(texts):
        for b, box_b in texts[k + 1:]:
            if _overlap(a, box_a, b, box_b):
                problems.append(f"texts {a.get_text()!r} and {b.get_text()!r} overlap ({_box(box_a)}, {_box(box_b)})")
    plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    columns = max((ax.get_subplotspec().get_gridspec().ncols for ax in plots if ax.get_subplotspec()), default=1)
    for ax in plots:
        if ax.bbox.width < MIN_AXES_SHARE * width / columns:
            problems.append(f"axes {ax.get_title()!r} is squeezed to {ax.bbox.width:.0f} px of {width / columns:.0f}")
    return problems


def _overlap(a: Text, box_a: Bbox, b: Text, box_b: Bbox) -> bool:
    """Whether two drawn texts share more than OVERLAP_PX in both directions. Texts turned by the same angle
    (tick labels at TICK_ROTATION) are compared as the turned rectangles they are: their upright boxes
    overlap at the corners although the letters do not."""
    angle = math.radians(a.get_rotation())
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    if a.get_rotation() % 180 != b.get_rotation() % 180 or abs(c - s) < 0.1:  # at 45° the sizes are not recoverable
        shared_x = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        shared_y = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        return shared_x > OVERLAP_PX and shared_y > OVERLAP_PX

    def size(box: Bbox) -> tuple[float, float]:  # the turned rectangle's length and height from its upright box
        return ((box.width * c - box.height * s) / (c * c - s * s), (box.height * c - box.width * s) / (c * c - s * s))

    (wa, ha), (wb, hb) = size(box_a), size(box_b)
    dx, dy = box_b.x0 + box_b.width / 2 - box_a.x0 - box_a.width / 2, box_b.y0 + box_b.height / 2 - box_a.y0 - box_a.height / 2
    along = abs(dx * math.cos(angle) + dy * math.sin(angle))
    across = abs(-dx * math.sin(angle) + dy * math.cos(angle))
    return along < (wa + wb) / 2 - OVERLAP_PX and across < (ha + hb) / 2 - OVERLAP_PX


def _box(box: Bbox) -> str:
    return f"[{box.x0:.0f}, {box.x1:.0f}] × [{box.y0:.0f}, {box.y1:.0f}]"


def fix_layout(fig: Figure) -> list[str]:
    """Mend what `layout_problems` finds where a rule can: x tick labels that touch are turned by
    TICK_ROTATION; then the figure is widened step by step up to MAX_WIDTH_INCHES. Returns the problems
    left (empty: none)."""
    problems = layout_problems(fig)
    if any("overlap" in p for p in problems):
        for ax in fig.axes:
            labels = [t for t, _ in _tick_texts(fig, ax)]
            if _touching(fig, labels):
                for label in labels:
                    label.set_rotation(TICK_ROTATION)
                    label.set_horizontalalignment("right")
                    label.set_rotation_mode("anchor")
        problems = layout_problems(fig)
    while problems and fig.get_figwidth() < MAX_WIDTH_INCHES:
        fig.set_figwidth(min(MAX_WIDTH_INCHES, fig.get_figwidth() * WIDEN_STEP))
        problems = layout_problems(fig)
    return problems


def _tick_texts(fig: Figure, ax) -> list[tuple[Text, Bbox]]:
    ticks = {id(t.label1) for t in ax.xaxis.get_major_ticks()}
    return [(t, box) for t, box in drawn_texts(fig) if id(t) in ticks]


def _touching(fig: Figure, labels: list[Text]) -> bool:
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    return any(a.x1 > b.x0 - OVERLAP_PX for a, b in zip(boxes, boxes[1:]))


def save(fig: Figure, path: Path) -> Path:
    """Mend the layout (`fix_layout`) and write the figure as PNG at DPI to `path` (creating its folder),
    whole-then-rename (`dvtrain.storage.replacing`). Returns `path`. Raises StorageError where `path` is
    not a regular file or a new path."""
    path = Path(path)
    fix_layout(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.replacing(path, "plot") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path
