"""The transferability matrices (`dvtrain.eval.transfer`) as a table of the suite: results.json
"transfer"[stage], a heat map per stage, the mean off-diagonal success as a number (lower is better)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from dvtrain.eval.report import (MIXTURE, TRANSFER_OFFDIAG, cell, counted, format_eps, matrix_markdown, mean_off_diagonal,
                                 stage_order)
from dvtrain.eval.tables.contract import Number, Suite, Table

if TYPE_CHECKING:
    from dvtrain.eval.share import Tasks

KIND = "transfer"


class TransferTable(Table):
    name = "transfer"
    section = "eval.transfer"

    def work(self, suite: Suite) -> Generator[Tasks, list, dict]:
        from dvtrain.eval.transfer import shuffled_test_set, transfer_work

        x, y = shuffled_test_set(suite.data, suite.cfg.seed)
        tasks, finish = transfer_work(suite.loaded, x, y, suite.tcfg, suite.cfg.seed)
        return finish((yield tasks))

    def assemble(self, suite: Suite, done: dict, new: dict) -> dict:
        return done

    def figures(self, suite: Suite, results: dict) -> dict[str, dict[str, str]]:
        from dvtrain.eval.plots import PLOTS_DIR, transfer_heatmap

        run_dir = suite.run_dir
        return {stage: {KIND: transfer_heatmap(results[self.name][stage], f"{stage}: PGD transfer success",
                                               run_dir / PLOTS_DIR / f"transfer_{stage}.png").relative_to(run_dir).as_posix()}
                for stage in suite.loaded if stage in results.get(self.name, {})}

    def markdown(self, results: dict) -> list[str]:
        plots = results.get("plots", {})
        out = []
        for stage in stage_order(results.get(self.name, {})):
            m = results[self.name][stage]
            off = mean_off_diagonal(m)
            out += [f"## Transferability: {stage}", "",
                    f"PGD-L∞ ε={format_eps(m['eps'])}, {m['steps']} steps, {counted(m['restarts'], 'restart')}, crafted on the row's "
                    f"submodel; success rate (%) on the column's model, over {m['n_images']} test images every submodel "
                    f"classifies correctly. Mean off-diagonal success: {cell(off)}%.", "",
                    *matrix_markdown(stage, m["sources"], m["targets"], m["success"]), ""]
            if KIND in plots.get(stage, {}):
                out += [f"![transferability {stage}]({plots[stage][KIND]})", ""]
        return out

    def numbers(self, results: dict) -> list[Number]:
        # Its basis is the attack and the images drawn (num_images), not n_images: the images every submodel
        # classifies correctly, which are attacked, differ from run to run.
        return [Number(stage, MIXTURE, TRANSFER_OFFDIAG, matrix.get("eps") or None, mean_off_diagonal(matrix),
                       transfer_basis_text(matrix), TRANSFER_OFFDIAG)
                for stage, matrix in results.get(self.name, {}).items()]

    def wandb_tables(self, results: dict) -> dict[str, tuple[list[str], list[list]]]:
        return {f"eval/{stage}/transfer_matrix": (["source", *m["targets"]], [[s, *row] for s, row in zip(m["sources"], m["success"])])
                for stage, m in results.get(self.name, {}).items()}


TABLE = TransferTable()


def transfer_basis_text(matrix: dict) -> str:
    """What a transferability matrix's numbers rest on: PGD's steps, step size and restarts, and how many test
    images were drawn (results of an earlier dvtrain lack the last two)."""
    step = f" of {matrix['step_fraction']:g}·ε" if matrix.get("step_fraction") is not None else ""
    drawn = f", of the first {matrix['num_images']} images" if matrix.get("num_images") is not None else ""
    return f"{matrix.get('steps')} steps{step}, {matrix.get('restarts')} restarts{drawn}"
