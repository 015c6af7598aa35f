"""The headline of a run's results: per stage, the mixture's clean accuracy, its worst case under every
white-box attack of a table at the run's headline ε (eval.eps for L∞, eval.l2_eps for L2), and its black-box
"all" accuracy at the headline L∞ ε; each number with its n and 95 % Wilson interval, under the label of the
table it comes from. results.md opens with it, and `dvtrain eval` ends with it (issue 29, items 1 and 2).

A number is taken as stored, never recomputed or merged: where results.json holds several rows for one
(stage, table, norm, ε) — other budgets or attack code versions — each is shown with its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from dvtrain.eval.stats import PERCENT, wilson_interval

MIXTURE = "mixture"
WORST_CASE = "worst_case"
CLEAN = "clean"
ALL = "all"  # the black-box protocol's column: correct under every example set at that ε
# Tables of results.json, most thorough first: `dvtrain eval`'s (eval.full_attacks) wins over training's.
TABLE_LABELS = {"eval": "dvtrain eval", "train": "dvtrain train"}


@dataclass(frozen=True)
class Headline:
    """The headline ε of a run: `linf` for L∞ (eval.eps), `l2` for L2 (eval.l2_eps), both in pixel units
    (pixels in [0, 1])."""

    linf: float
    l2: float


def _figure(accuracy: float, n: int, low: float | None = None, high: float | None = None) -> str:
    """'57.66 [52.5, 62.7] n=359': accuracy (%) with its 95 % Wilson interval (computed from n when not
    stored)."""
    if low is None or high is None:
        low, high = wilson_interval(accuracy / PERCENT * n, n)
    return f"{accuracy:.2f} [{low:.1f}, {high:.1f}] n={n}"


def _row_figure(row: dict, several: bool) -> str:
    """One row's figure; where a cell holds several rows, each with its budget, less the n the figure shows."""
    figure = _figure(row["accuracy"], row["n"], row.get("ci_low"), row.get("ci_high"))
    budget = ",".join(part for part in (row.get("budget") or "").split(",") if part and part != f"n={row['n']}")
    return f"{figure} ({budget})" if several and budget else figure


def table_rank(table: str | None) -> int:
    """How thorough the table a white-box row comes from is (its "table" field): its place in TABLE_LABELS,
    0 for `dvtrain eval`'s; a row without a known table (an earlier dvtrain's) ranks after every known one.
    The rule that picks the headline's table, and `dvtrain compare`'s number where both tables have one."""
    return list(TABLE_LABELS).index(table) if table in TABLE_LABELS else len(TABLE_LABELS)


def _table_of(rows: list[dict], stage: str) -> str | None:
    """The most thorough table results.json holds for `stage` (`table_rank`), None if none."""
    tables = {r.get("table") for r in rows if r["stage"] == stage and r["model"] == MIXTURE} & set(TABLE_LABELS)
    return min(tables, key=table_rank, default=None)


def _cell(rows: list[dict], attack: str, norm: str | None, eps: float | None) -> str:
    found = [r for r in rows if r["attack"] == attack and r.get("norm") == norm
             and (eps is None or r.get("eps") is not None and abs(r["eps"] - eps) < 1e-12)
             and r.get("accuracy") is not None and r.get("n")]
    return "; ".join(_row_figure(r, len(found) > 1) for r in found) or "—"


def _blackbox_cell(table: dict | None, eps: float) -> str:
    """The mixture's "all" accuracy at `eps` with its n (the protocol's images) and interval; '—' when the
    stage has no black-box table or the sweep did not include `eps`."""
    if not table or ALL not in table or MIXTURE not in table.get("models", []):
        return "—"
    at = [k for k, e in enumerate(table["eps"]) if abs(e - eps) < 1e-12]
    value = table[ALL][table["models"].index(MIXTURE)][at[0]] if at else None
    n = table.get("n_images")
    return "—" if value is None or not n else _figure(value, n)


def headline_rows(results: dict, stages: list[str], eps: Headline) -> list[list[str]]:
    """One row per stage of `stages` that has a mixture row in results.json (a dict as
    `dvtrain.results.load_results` returns it): [stage, table label, clean, worst case L∞ at eps.linf,
    worst case L2 at eps.l2, black-box "all" at eps.linf]; cells are '—' where nothing was computed."""
    out = []
    for stage in stages:
        table = _table_of(results.get("eval", []), stage)
        if table is None:
            continue
        rows = [r for r in results["eval"] if r["stage"] == stage and r["model"] == MIXTURE and r.get("table") == table]
        out.append([stage, TABLE_LABELS[table], _cell(rows, CLEAN, None, None), _cell(rows, WORST_CASE, "Linf", eps.linf),
                    _cell(rows, WORST_CASE, "L2", eps.l2), _blackbox_cell(results.get("blackbox", {}).get(stage), eps.linf)])
    return out


def headline_header(eps: Headline) -> list[str]:
    return ["Stage", "Table", "Clean (%)", f"Worst case L∞ ε={eps.linf:g} (%)", f"Worst case L2 ε={eps.l2:g} (%)",
            f"Black-box all L∞ ε={eps.linf:g} (%)"]


EXPLANATION = ("The mixture of each stage: accuracy (%) with its 95 % Wilson interval and n test images. Worst case: "
               "images that survive every white-box attack of the table named (its budgets are in the stage's table "
               "below); black-box all: correct under every transfer example set of the protocol at that ε.")


def headline_markdown(results: dict, stages: list[str], eps: Headline) -> str:
    """results.md's opening summary ('## Summary', a table from `headline_rows`); '' when no stage has a
    mixture row yet."""
    rows = headline_rows(results, stages, eps)
    if not rows:
        return ""
    header = headline_header(eps)
    lines = ["## Summary", "", EXPLANATION, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n"


def headline_lines(results: dict, stages: list[str], eps: Headline) -> list[str]:
    """The same figures as `headline_markdown`, one plain line per stage and number, for a terminal."""
    header = headline_header(eps)
    lines = []
    for row in headline_rows(results, stages, eps):
        lines.append(f"  {row[0]} (mixture, table of `{row[1]}`):")
        lines += [f"    {name:<32} {value}" for name, value in zip(header[2:], row[2:])]
    return lines
