"""Accuracy against ε (`dvtrain.eval.sweep`) as a table of the suite: each (stage, model, attack, ε) cell a
task costed by the attack record, on the black-box protocol's images (so its worst case and the black-box
"all" column at one ε count the same images); results.json "eps_sweep"[stage] and a figure per stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from typing import TYPE_CHECKING

from dvtrain.eval.report import attack_header, counted, format_eps, matrix_markdown, stage_order
from dvtrain.eval.tables.contract import Suite, Table

if TYPE_CHECKING:
    from dvtrain.eval.share import Tasks

KIND = "eps_sweep"


class SweepTable(Table):
    name = "eps_sweep"
    section = "eval.transfer"

    def work(self, suite: Suite) -> Generator[Tasks, list, dict]:
        from dvtrain.digest import images_digest
        from dvtrain.eval.blackbox import blackbox_images
        from dvtrain.eval.sweep import sweep_work

        x, y, _ = blackbox_images(suite.data, suite.tcfg)
        sweep_cfg = dataclasses.replace(suite.cfg.eval, transfer=suite.tcfg)
        tasks, finish = sweep_work(suite.loaded, x, y, sweep_cfg, suite.cfg.seed)  # tcfg.sweep_attacks and their worst case
        sweeps = finish((yield tasks))
        return {stage: sweep | {"images": images_digest(x, y)} for stage, sweep in sweeps.items()}

    def assemble(self, suite: Suite, done: dict, new: dict) -> dict:
        return done

    def figures(self, suite: Suite, results: dict) -> dict[str, dict[str, str]]:
        from dvtrain.eval.plots import PLOTS_DIR, eps_sweep_plot

        run_dir = suite.run_dir
        return {stage: {KIND: eps_sweep_plot(results[self.name][stage], f"{stage}: robust accuracy vs ε",
                                             run_dir / PLOTS_DIR / f"eps_sweep_{stage}.png").relative_to(run_dir).as_posix()}
                for stage in suite.loaded if stage in results.get(self.name, {})}

    def markdown(self, results: dict) -> list[str]:
        plots = results.get("plots", {})
        out = []
        for stage in stage_order(results.get(self.name, {})):
            out += _sweep_markdown(stage, results[self.name][stage])
            if KIND in plots.get(stage, {}):
                out += [f"![accuracy vs ε {stage}]({plots[stage][KIND]})", ""]
        return out


def _sweep_markdown(stage: str, s: dict) -> list[str]:
    """Accuracy against ε (`dvtrain.eval.sweep`): the worst case per model, then each attack per model;
    a results.json of dvtrain before the worst case (PGD only, "accuracy") as it was."""
    columns = [f"ε={format_eps(e)}" for e in s["eps"]]
    budget = f"{s['steps']} steps of {s['step_fraction']:g}·ε, {counted(s['restarts'], 'restart')}, {s['n_images']} test images"
    if "worst_case" not in s:
        return [f"## Accuracy vs ε: {stage}", "", f"White-box PGD-L∞, {budget}.", "",
                *matrix_markdown(stage, s["models"], columns, s["accuracy"]), ""]
    out = [f"## Accuracy vs ε: {stage}", "",
           f"Robust accuracy (%) under white-box L∞ attacks, PGD with {budget} (the black-box table's images); "
           "worst case: per image, correct clean and under every attack run on that model at that ε "
           f"(submodels: {', '.join(attack_header(a) for a in s['of'][s['models'][0]])}; "
           f"mixture: {', '.join(attack_header(a) for a in s['of']['mixture'])}).", "",
           "Worst case:", "", *matrix_markdown(stage, s["models"], columns, s["worst_case"]), ""]
    for attack, table in s["attacks"].items():
        ran = [(m, row) for m, row in zip(s["models"], table) if any(v is not None for v in row)]
        out += [f"{attack_header(attack)}:", "", *matrix_markdown(stage, [m for m, _ in ran], columns,
                                                                     [row for _, row in ran]), ""]
    return out


TABLE = SweepTable()
