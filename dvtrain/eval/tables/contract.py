"""The contract every table of `dvtrain eval` meets, and what the suite hands it.

A table is one record (a `Table` subclass instance) that says:
- `name`: its results.json section (stage → entry), `section`: the config section it declares (dotted,
  e.g. "eval.transfer"), `reads`: the sections of other tables its `assemble` reads (those tables are
  registered, and so run, before it); a plug-in table's own section is `settings`, a dataclass whose
  fields (declared with `dvtrain.config.ranged`) become eval.tables.NAME.FIELD, read as `suite.settings(table)`;
- `work(suite)`: a generator that yields `dvtrain.eval.share.Tasks` (rank-independent tasks with costs)
  and is sent each batch's results on every rank (`dvtrain.eval.share.run_work`); it returns what
  `assemble` needs;
- `assemble(suite, done, new)`: on rank 0 only, its entries from `done` and the entries of the tables
  before it (`new`, section → entries);
- `store(stored, entries)`: merge them into results.json (default: per stage, replacing that stage's entry);
- `figures(suite, results)`, `markdown(results)`, `numbers(results)`, `wandb_tables(results)`: its figures,
  its results.md section(s), its numbers for `dvtrain compare` and the W&B summary, its W&B tables.

The defaults do nothing, so a table implements only what it has. The readers (`markdown`, `numbers`) get
results.json as stored, which may hold entries written by older dvtrain releases.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dvtrain.config import Config, TransferConfig
    from dvtrain.data import Dataset
    from dvtrain.eval.progress import Phases
    from dvtrain.eval.share import Share, Tasks
    from dvtrain.eval.surrogates import SurrogateTrainer


@dataclass
class Suite:
    """What every table of one `dvtrain eval` sees: the run, its config (`tcfg`: eval.transfer as checked),
    the data on `device`, every evaluated stage's submodels (`loaded`, eval mode, in training order), the
    processes (`share`, None: one) and the progress phases."""

    run_dir: Path
    cfg: Config
    tcfg: TransferConfig
    data: Dataset
    device: torch.device
    loaded: dict[str, list[nn.Module]]
    share: Share | None
    phases: Phases
    command: str
    train_surrogates: SurrogateTrainer

    def settings(self, table: Table) -> Any:
        """A plug-in table's own settings (`Table.settings`: eval.tables.NAME as configured).

        Raises:
            KeyError: the table declares no settings.
        """
        return self.cfg.eval.tables[table.name]

    @property
    def main(self) -> bool:
        """Whether this process assembles and writes (rank 0, or the only process)."""
        return self.share is None or self.share.rank == 0


class Number(NamedTuple):
    """One number a table shows outside results.md: `dvtrain compare`'s column (stage, model, metric, eps)
    with `basis` (what it rests on: runs on other bases are never averaged), `name` (the metric as
    `dvtrain.eval.report.result_metrics` names it) and `value` (None: not measured)."""

    stage: str
    model: str
    metric: str
    eps: float | None
    value: float | None
    basis: str
    name: str


class Table:
    """The record of one evaluation table (see the module's docstring); subclass it and override what the
    table has."""

    name: str = ""
    section: str = ""
    reads: tuple[str, ...] = ()
    settings: type | None = None  # a plug-in table's own config section (a dataclass): eval.tables.NAME

    def enabled(self, suite: Suite) -> bool:
        """Whether it runs in this evaluation (e.g. its section's `enabled`)."""
        return True

    def work(self, suite: Suite) -> Generator[Tasks, list, Any]:
        """Its shareable work: yield `Tasks`, receive their results; return what `assemble` needs."""
        return None
        yield  # a generator with nothing to share

    def assemble(self, suite: Suite, done: Any, new: dict[str, Any]) -> Any:
        """Rank 0: its entries (stage → entry) from its work's result `done` and the entries of the tables
        before it (`new`: section → entries)."""
        return {}

    def store(self, stored: dict, entries: Any) -> None:
        """Merge `entries` into results.json `stored` (in place): each stage's entry replaces the stage's old one."""
        stored.setdefault(self.name, {}).update(entries)

    def figures(self, suite: Suite, results: dict) -> dict[str, dict[str, str]]:
        """Draw its figures under the run directory from `results` (as merged): stage → kind → path
        relative to the run, recorded in results.json "plots"."""
        return {}

    def markdown(self, results: dict) -> list[str]:
        """Its results.md lines (none when results.json holds none of its entries)."""
        return []

    def numbers(self, results: dict) -> list[Number]:
        """Its numbers for `dvtrain compare` and the W&B summary."""
        return []

    def wandb_tables(self, results: dict) -> dict[str, tuple[list[str], list[list]]]:
        """W&B tables it logs: key → (columns, rows)."""
        return {}
