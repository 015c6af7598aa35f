"""An evaluation table defined outside dvtrain: how often the submodels agree on a clean test image
(the share of images on which every submodel predicts the same class; a DVERGE ensemble should still
agree on clean images while disagreeing on its vulnerabilities). One record, registered by its package's
entry point (group dvtrain.tables): `dvtrain eval` runs it, results.json, results.md, `dvtrain compare`
and the W&B summary show it, and nothing in dvtrain/ names it. It imports no torch until it runs."""

from __future__ import annotations

from dataclasses import dataclass

from dvtrain.config import COUNT_MAX, ranged
from dvtrain.eval.report import cell, model_label, stage_order
from dvtrain.eval.tables.contract import Number, Table

MIXTURE = "mixture"
METRIC = "agreement"


@dataclass
class AgreementSettings:
    """The table's own config section, eval.tables.agreement (typed and ranged like dvtrain's own)."""

    # Clean test images compared: the first N; 0: as many as the white-box table (eval.num_examples).
    num_images: int = ranged(0, ge=0, le=COUNT_MAX, note="0: as many as eval.num_examples")


class AgreementTable(Table):
    name = "agreement"
    section = "eval.tables.agreement"
    settings = AgreementSettings

    def work(self, suite):
        from dvtrain.eval.share import Tasks

        cfg = suite.cfg.eval
        wanted = suite.settings(self).num_images or cfg.num_examples
        n = len(suite.data.y_test) if wanted == 0 else min(wanted, len(suite.data.y_test))
        x = suite.data.x_test[:n]
        stages = list(suite.loaded)

        def agree(stage: str) -> dict:
            import torch

            with torch.no_grad():
                classes = torch.cat([torch.stack([m(x[s : s + cfg.batch_size]).argmax(1) for m in suite.loaded[stage]])
                                     for s in range(0, n, cfg.batch_size)], dim=1)
            return {"n_images": n, METRIC: float((classes == classes[0]).all(dim=0).double().mean() * 100)}

        done = yield Tasks(stages, [float(n)] * len(stages), agree, [n] * len(stages), "submodel agreement")
        return dict(zip(stages, done))

    def assemble(self, suite, done, new):
        return done

    def figures(self, suite, results):
        """One bar chart of every stage's agreement, drawn with dvtrain's figure style (a plug-in's figure
        is recorded under "plots" and linked from results.md like the built-in ones)."""
        from dvtrain import figure_style as style
        from dvtrain.eval.plots import PLOTS_DIR

        entries = results.get(self.name, {})
        stages = stage_order(entries)
        fig = style.new_figure(*style.LINE_FIGSIZE)
        ax = fig.add_subplot()
        ax.bar(stages, [entries[stage][METRIC] for stage in stages], color=style.COLORS[0])
        ax.set(ylim=style.PERCENT_RANGE, ylabel="clean images all submodels agree on (%)",
               title=f"Submodel agreement ({entries[stages[0]]['n_images']} test images)")
        path = style.save(fig, suite.run_dir / PLOTS_DIR / "agreement.png")
        return {stage: {METRIC: path.relative_to(suite.run_dir).as_posix()} for stage in stages if stage in suite.loaded}

    def markdown(self, results):
        entries = results.get(self.name, {})
        if not entries:
            return []
        lines = ["## Submodel agreement", "", "Clean test images on which every submodel predicts the same class (%).", "",
                 "| Stage | Images | Agreement (%) |", "|---|---:|---:|"]
        lines += [f"| {stage} | {entries[stage]['n_images']} | {cell(entries[stage][METRIC])} |" for stage in stage_order(entries)]
        return [*lines, ""]

    def numbers(self, results):
        return [Number(stage, MIXTURE, METRIC, None, e[METRIC], f"n={e['n_images']}", METRIC)
                for stage, e in results.get(self.name, {}).items()]

    def wandb_tables(self, results):
        rows = [[stage, model_label(stage, MIXTURE), e[METRIC]] for stage, e in results.get(self.name, {}).items()]
        return {"eval/agreement": (["stage", "model", METRIC], rows)} if rows else {}


TABLE = AgreementTable()
