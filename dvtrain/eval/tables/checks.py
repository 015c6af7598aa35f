"""The gradient-masking checks (`dvtrain.eval.checks`) as a table of the suite: each stage's masking probe
(two extra PGD runs on the mixture, each from its own stream) is a task; rank 0 compares the stage's
white-box rows, its black-box table and its ε sweep. Its lines are drawn under `dvtrain eval`'s white-box
table in results.md (`dvtrain.eval.report.results_markdown`), so it has no section of its own."""

from __future__ import annotations

from collections.abc import Generator

from dvtrain.eval.tables.contract import Suite, Table


class ChecksTable(Table):
    name = "checks"
    section = "eval.checks"
    reads = ("eval", "blackbox", "eps_sweep")

    def work(self, suite: Suite) -> Generator[Tasks, list, dict]:
        from dvtrain.eval.checks import masking_probe
        from dvtrain.eval.share import Tasks
        from dvtrain.mixture import Mixture

        cfg = suite.cfg
        if not cfg.eval.checks.enabled:
            return {}
        stages = list(suite.loaded)

        def probe(stage: str) -> dict:
            return masking_probe(Mixture(suite.loaded[stage]), suite.data.x_test, suite.data.y_test, cfg.eval, cfg.seed)

        # A task per stage (its two PGD runs of checks.long_steps iterations), shared out like any other.
        done = yield Tasks(stages, [2.0 * cfg.eval.checks.long_steps] * len(stages), probe, None, "gradient-masking checks")
        return dict(zip(stages, done))

    def assemble(self, suite: Suite, done: dict, new: dict) -> dict:
        from dvtrain.eval.checks import masking_checks

        rows = new.get("eval", [])
        return {stage: masking_checks(stage, [r for r in rows if r["stage"] == stage], done.get(stage),
                                      new.get("blackbox", {}).get(stage), suite.cfg.eval, new.get("eps_sweep", {}).get(stage))
                for stage in suite.loaded}


TABLE = ChecksTable()
