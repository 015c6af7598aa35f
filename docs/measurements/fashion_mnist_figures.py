"""Redraw docs/img/fashion_mnist/*.png with dvtrain's figure code from the study's numbers.

The study's results.json was not kept. `fashion_mnist_figures.json` holds what the page
docs/results_fashion_mnist.md prints (the black-box "all" and per-ensemble tables, the ε sweep's worst
case and the white-box table's mixture row, in % to 0.1, n = 300 / 500) and the three diversity
matrices as the page's earlier figures printed them (nats, to 0.01; D before the symmetric metric of
issue 26, as the page's diagonal and off-diagonal means are). Run from the repository root:

    python docs/measurements/fashion_mnist_figures.py
"""

import json
import shutil
import tempfile
from pathlib import Path

from dvtrain.eval.blackbox_plot import add_blackbox_plot
from dvtrain.eval.diversity import diversity_plots

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "img" / "fashion_mnist"
SHIPPED = ("blackbox_all.png", "whitebox_worst_case.png", "diversity_vanilla.png", "diversity_dverge.png",
           "diversity_gal.png")

results = json.loads((HERE / "fashion_mnist_figures.json").read_text(encoding="utf-8"))
with tempfile.TemporaryDirectory() as tmp:
    add_blackbox_plot(Path(tmp), results, results["stages"])
    diversity_plots(Path(tmp), results)
    for name in SHIPPED:
        shutil.copyfile(Path(tmp) / "plots" / name, IMG / name)
print("redrawn: " + ", ".join(str(IMG / name) for name in SHIPPED))
