"""Training curves as PNGs, with or without a W&B account: the seed report's Figures 2–4.

Each submodel's training loss (the stage's main loss, averaged over each epoch's steps) and the
mixture's test ("validation") loss at each epoch's end, against epochs, one figure per stage at
`RUN_DIR/plots/<stage>_loss.png`. Drawn from the history the stage loop keeps
(`dvtrain.tracking.StepHistory`, `RUN_DIR/wandb/<stage>-history.jsonl`): per step the row
`train/<loss>/sub<i>`, per epoch a row holding `epoch` and `test/loss/mixture`.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dvtrain import figure_style as style
from dvtrain.rundir import RunDir
from dvtrain.eval.report import model_label

TEST_LOSS = "test/loss/mixture"  # the mixture's NLL on the test set at each epoch's end (dvtrain.train.loop)
SUBMODEL_KEY = re.compile(r"^train/(?P<loss>.+)/sub(?P<index>\d+)$")
MIXTURE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 2.0, "marker": "s"}


@dataclass
class LossCurves:
    """Per-epoch losses of one stage: epochs are 1-based; `train[i][k]` is submodel i's mean main loss
    over the steps of epoch `train_epochs[k]`; `test[k]` the mixture's test loss after epoch `test_epochs[k]`."""

    train_epochs: list[int]
    train: dict[int, list[float]]
    test_epochs: list[int]
    test: list[float]


def read_history(path: Path) -> list[dict]:
    """The entries {"step", "row", "epoch"} of a StepHistory file; a line torn by a kill is skipped."""
    entries = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def loss_curves(entries: list[dict], main_loss: str, steps_per_epoch: int) -> LossCurves:
    """Per-epoch curves from history entries: a step row of global step s (1-based) belongs to epoch
    ⌈s / steps_per_epoch⌉; `main_loss` is the stage's per-submodel loss name, e.g. "loss/dverge"."""
    per_epoch: dict[int, dict[int, list[float]]] = {}
    test: dict[int, float] = {}
    for entry in entries:
        row = entry["row"]
        if entry.get("epoch"):
            if TEST_LOSS in row:
                test[int(row["epoch"])] = row[TEST_LOSS]
            continue
        epoch = (entry["step"] - 1) // steps_per_epoch + 1
        for key, value in row.items():
            match = SUBMODEL_KEY.match(key)
            if match and match["loss"] == main_loss:
                per_epoch.setdefault(epoch, {}).setdefault(int(match["index"]), []).append(value)
    epochs = sorted(per_epoch)
    models = sorted({i for losses in per_epoch.values() for i in losses})
    train = {i: [statistics.mean(per_epoch[e][i]) for e in epochs] for i in models}
    return LossCurves(epochs, train, sorted(test), [test[e] for e in sorted(test)])


def loss_figure(curves: LossCurves, stage: str, main_loss: str) -> Figure:
    """The figure: one line per submodel (training loss), the mixture's test loss dashed in black."""
    fig = style.new_figure(*style.LINE_FIGSIZE)
    ax = fig.add_subplot()
    for i, losses in curves.train.items():
        ax.plot(curves.train_epochs, losses, marker="o", label=f"{model_label(stage, f'sub{i}')}: training loss")
    if curves.test:
        ax.plot(curves.test_epochs, curves.test, label="Mixture: test loss (NLL)", **MIXTURE_STYLE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss (training: {main_loss.removeprefix('loss/')})")
    ax.set_title(f"{stage}: training and test loss")
    ax.grid(alpha=style.GRID_ALPHA)
    fig.legend(loc="outside lower center", ncols=2, fontsize=style.SMALL)
    return fig


def training_curves(run_dir: Path, stage: str, history: Path, main_loss: str, steps_per_epoch: int) -> Path | None:
    """Draw `RUN_DIR/plots/<stage>_loss.png` from the stage's history; None (nothing written) when the
    history holds no step of the stage (e.g. zero epochs). Call it on the main process only."""
    curves = loss_curves(read_history(history), main_loss, steps_per_epoch)
    if not curves.train_epochs:
        return None
    return style.save(loss_figure(curves, stage, main_loss), RunDir(run_dir).loss_curve(stage))
