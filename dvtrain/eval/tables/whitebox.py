"""The white-box table (`dvtrain.eval.whitebox`) as a table of the suite: every stage's submodels and mixture
under eval.full_attacks, each (model, attack, seed, chunk of images) one task costed by the attack record,
its rows merged into results.json's "eval" by their key (`dvtrain.results.merge_rows`). Its markdown is
`dvtrain.eval.report.results_markdown`, which draws training's table too (with the checks' lines)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from dvtrain.eval.report import EVAL_TABLE
from dvtrain.eval.tables.contract import Suite, Table
from dvtrain.results import ROWS, merge_rows

if TYPE_CHECKING:
    from dvtrain.eval.share import Tasks


class WhiteboxTable(Table):
    name = ROWS
    section = "eval"

    def work(self, suite: Suite) -> Generator[Tasks, list, dict[str, list[dict]]]:
        from dvtrain.eval.whitebox import plan_rows, plan_tasks, stage_plan

        cfg = suite.cfg
        plans = [stage_plan(stage, submodels, suite.data.x_test, suite.data.y_test, cfg.eval, cfg.seed, cfg.eval.full_attacks)
                 for stage, submodels in suite.loaded.items()]
        rows = {}
        for plan in plans:
            if suite.main:
                print(f"[eval {plan.stage}] white-box table: {', '.join(suite.cfg.eval.full_attacks)}", flush=True)
            masks: dict[str, dict] = {}
            for name, tasks in plan_tasks(plan):
                done = yield tasks
                masks.setdefault(name, {}).update(zip(tasks.items, done))
            rows[plan.stage] = plan_rows(plan, masks)
        return rows

    def assemble(self, suite: Suite, done: dict[str, list[dict]], new: dict) -> list[dict]:
        return [r | {"table": EVAL_TABLE, "command": suite.command} for stage in done for r in done[stage]]

    def store(self, stored: dict, entries: list[dict]) -> None:
        stored[ROWS] = merge_rows(stored[ROWS], entries)


TABLE = WhiteboxTable()
