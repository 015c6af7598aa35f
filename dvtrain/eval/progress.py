"""Progress and wall time of `dvtrain eval`'s long phases (each attack on each model, surrogate
training, black-box example generation, the transfer matrix, the ε sweep).

One tqdm bar per phase on the main process, counting images (so tqdm shows images/s and the ETA), and
the seconds each phase took, which `dvtrain eval` stores in results.json's "eval_provenance" and in
the W&B summary. Bars follow logging.progress and, like training's, appear only on a terminal; the
environment variable DVTRAIN_PROGRESS=1 shows them anywhere (logs, captured output).

A finished bar is erased (as pip's and tqdm's own are), and a phase that is not part of another one leaves
one line, "[eval] <phase>: <seconds> s", on a terminal and in logs alike, so the console keeps one line per
phase rather than hundreds of finished bars. Lines printed while a bar is shown go above the bars
(`tqdm.write`) instead of being glued to them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from dvtrain.tracking import PROGRESS_ENV as FORCE_ENV  # one name for training and evaluation bars


ELAPSED_ONLY = "{desc}: {elapsed}"  # a phase without an image count: its name and the time so far


class _AboveTheBars(io.TextIOBase):
    """A stdout that writes each complete line with `tqdm.write`, which clears the shown bars, prints the
    line and draws the bars again."""

    def __init__(self, target) -> None:
        self.target = target
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            tqdm.write(line, file=self.target)
        return len(text)

    def flush(self) -> None:
        self.target.flush()


class Phases:
    """Seconds per phase name (summed if a phase repeats), and a bar per phase when `show`."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.seconds: dict[str, float] = {}
        self.depth = 0  # phases open now: only the outermost leaves a line

    @contextlib.contextmanager
    def phase(self, name: str, images: int | None = None, detail: str = "", counting: str = "images",
              unit: str = "img") -> Iterator[tqdm]:
        """Time the block as phase `name`; yields a bar of `images` images (None: a bar that only shows the
        elapsed time) to `update(k)` as k more are done. `detail` is added to the phase's line; `counting` is
        what the line says the count is, `unit` the bar's (a phase that scores each image once per example
        set counts scorings, not images)."""
        disable = True if not self.show else (False if os.environ.get(FORCE_ENV) == "1" else None)
        bar = tqdm(total=images, desc=name, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                   leave=False, mininterval=0.5, bar_format=None if images else ELAPSED_ONLY)
        start = time.perf_counter()
        self.depth += 1
        redirect = (contextlib.redirect_stdout(_AboveTheBars(sys.stdout)) if self.depth == 1 and not bar.disable
                    else contextlib.nullcontext())
        try:
            with redirect:
                yield bar
        finally:
            bar.close()
            self.depth -= 1
            elapsed = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
        if self.show and self.depth == 0:  # not on an exception: the error is the last line then
            done = f", {images} {counting}" if images else ""
            print(f"[eval] {name}: {elapsed:.1f} s{done}{f' ({detail})' if detail else ''}", flush=True)
