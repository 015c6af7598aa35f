"""The vulnerability-diversity matrices (`dvtrain.eval.diversity`) as a table of the suite: each (stage, row)
a task, results.json "diversity"[stage] with its heat map's path, one results.md section per stage."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from dvtrain.eval.report import format_eps, matrix_markdown, stage_order
from dvtrain.eval.tables.contract import Suite, Table

if TYPE_CHECKING:
    from dvtrain.eval.share import Tasks


class DiversityTable(Table):
    name = "diversity"
    section = "eval.diversity"

    def enabled(self, suite: Suite) -> bool:
        return suite.cfg.eval.diversity.enabled

    def work(self, suite: Suite) -> Generator[Tasks, list, dict]:
        from dvtrain.eval.diversity import diversity_work

        if suite.main:
            print(f"[eval] vulnerability-diversity matrices: {', '.join(suite.loaded)}", flush=True)
        tasks, finish = diversity_work(suite.loaded, suite.data, suite.cfg)
        return finish((yield tasks))

    def assemble(self, suite: Suite, done: dict, new: dict) -> dict:
        return done

    def figures(self, suite: Suite, results: dict) -> dict[str, dict[str, str]]:
        from dvtrain.eval.diversity import diversity_plots

        # From the merged results: every stage's heat map on one colour scale, also stages evaluated earlier.
        diversity_plots(suite.run_dir, results)  # records each path in its entry's "plot"
        return {}

    def markdown(self, results: dict) -> list[str]:
        return _diversity_markdown(results.get(self.name, {}))


def _diversity_markdown(entries: dict[str, dict]) -> list[str]:
    """One section per stage: the vulnerability-diversity matrix (dvtrain.eval.diversity) and its heat map."""
    out = []
    for stage in stage_order(entries):
        d = entries[stage]
        p = d["protocol"]
        out += [f"## Vulnerability diversity: {stage}", "",
                f"Mean cross-entropy (nats) of the column's submodel on images distilled on the row's submodel, "
                f"with the target images' labels (small: shared vulnerability); {d['n_images']} test-image pairs "
                f"every submodel classifies correctly, batches of {p['batch_size']}, "
                f"{'layer ' + str(p['layer']) if p['layer'] else 'a random layer per batch'}, distillation "
                f"ε={format_eps(p['eps'])}, {p['steps']} steps of {p['step_size']:g}, models in eval mode.", ""]
        if d["matrix"] is None:
            out += ["No test image is classified correctly by every submodel: nothing to measure.", ""]
            continue
        out += [*matrix_markdown(stage, d["models"], d["models"], d["matrix"]), ""]
        if "plot" in d:
            out += [f"![vulnerability diversity {stage}]({d['plot']})", ""]
    return out


TABLE = DiversityTable()
