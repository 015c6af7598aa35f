"""The layout of a run directory, known in this one place.

    RUN_DIR/
      config.yaml            the resolved configuration `dvtrain train` wrote
      results.json           every table's rows and what `dvtrain eval` adds (dvtrain.eval.report)
      results.md             the same, rendered for people
      checkpoints/<stage>/   each stage's checkpoints (dvtrain.checkpoint)
      plots/                 evaluation figures (PNG)
      wandb/                 W&B's offline runs and dvtrain's step histories
      .results.lock          the inter-process lock of results.json and the caches

Several processes may write to one run directory at once (two `dvtrain eval --stage …`, or `eval`
while `train` extends the run): whatever reads-modifies-writes results.json or a cache holds `lock()`
(an OS file lock from the `filelock` package, released if the holder dies). No torch import here.

The black-box surrogate ensembles and example sets are not in the run directory: they live in a cache
shared by every run on the same data, whose layout `dvtrain.eval.surrogates` owns (`cache_root`).
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

CONFIG = "config.yaml"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
WANDB = "wandb"
LOCK = ".results.lock"
# Seconds a writer waits for another process's hold of the lock: a read-modify-write of results.json
# takes milliseconds, but the surrogate cache is held while the surrogates train (an hour on CIFAR).
LOCK_TIMEOUT_S = -1  # filelock: wait as long as it takes


class RunDir:
    """Paths of one run directory (nothing is created by asking for a path)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def results_json(self) -> Path:
        return self.path / RESULTS_JSON

    @property
    def results_md(self) -> Path:
        return self.path / RESULTS_MD

    def checkpoints(self, stage: str | None = None) -> Path:
        """The folder of all checkpoints, or of one stage's."""
        folder = self.path / CHECKPOINTS
        return folder if stage is None else folder / stage

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    def loss_curve(self, stage: str) -> Path:
        """The figure of `stage`'s training losses (`dvtrain.train.curves`), drawn anew whenever it trains."""
        return self.plots / f"{stage}_loss.png"

    @property
    def wandb(self) -> Path:
        return self.path / WANDB

    def lock(self, name: str = LOCK, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
        """An inter-process lock file in the run directory (`with run.lock(): ...`); `name` picks another
        lock (the surrogate cache has its own, so a long training of surrogates blocks no results write).
        Re-entrant within one process. The run directory must exist."""
        return FileLock(str(self.path / name), timeout=timeout, is_singleton=True)
