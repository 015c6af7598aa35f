"""The headline of results.md and of `dvtrain eval`'s closing block (issue 29, items 1 and 2): each number as
stored, with its n and interval, under the label of the table it comes from; never merged across bases."""

from __future__ import annotations

from dvtrain.eval.headline import Headline, headline_lines, headline_markdown, headline_rows

EPS = Headline(linf=0.1, l2=0.5)


def row(stage, table, attack, norm, eps, accuracy, n=359, budget="n=359"):
    return {"stage": stage, "model": "mixture", "table": table, "attack": attack, "norm": norm, "eps": eps,
            "accuracy": accuracy, "n": n, "budget": budget}


def results():
    return {"eval": [row("vanilla", "train", "clean", None, 0.0, 98.0), row("vanilla", "train", "worst_case", "Linf", 0.1, 60.0),
                     row("dverge", "train", "worst_case", "Linf", 0.1, 99.0),  # superseded by dvtrain eval's table
                     row("dverge", "eval", "clean", None, 0.0, 97.0),
                     row("dverge", "eval", "worst_case", "Linf", 0.1, 50.0, budget="steps=25"),
                     row("dverge", "eval", "worst_case", "Linf", 0.1, 48.0, budget="steps=100"),
                     row("dverge", "eval", "worst_case", "L2", 0.3, 70.0),  # another ε than the headline's
                     {**row("dverge", "eval", "worst_case", "Linf", 0.1, 10.0), "model": "sub0"}],
            "blackbox": {"dverge": {"models": ["sub0", "mixture"], "eps": [0.05, 0.1], "n_images": 300,
                                    "all": [[90.0, 80.0], [95.0, 85.0]]}}}


def test_each_stage_shows_its_most_thorough_table_and_every_basis_apart():
    vanilla, dverge = headline_rows(results(), ["vanilla", "dverge"], EPS)
    assert vanilla[:3] == ["vanilla", "dvtrain train", "98.00 [96.0, 99.0] n=359"]
    assert vanilla[4:] == ["—", "—"]  # nothing computed at L2 ε=0.5, no black-box table
    assert dverge[1] == "dvtrain eval" and "99.00" not in " ".join(dverge)
    assert dverge[3] == "50.00 [44.9, 55.1] n=359 (steps=25); 48.00 [42.9, 53.2] n=359 (steps=100)"
    assert dverge[4] == "—"  # the L2 row is at ε=0.3, not the headline's 0.5
    assert dverge[5] == "85.00 [80.5, 88.6] n=300"  # the mixture's "all" at ε=0.1, not a submodel's


def test_results_md_summary_and_terminal_lines_carry_the_same_figures():
    markdown = headline_markdown(results(), ["vanilla", "dverge"], EPS)
    assert markdown.startswith("## Summary") and "| dverge | dvtrain eval | 97.00 [94.7, 98.3] n=359 |" in markdown
    lines = headline_lines(results(), ["dverge"], EPS)
    assert lines[0] == "  dverge (mixture, table of `dvtrain eval`):"
    assert lines[-1].split() == ["Black-box", "all", "L∞", "ε=0.1", "(%)", "85.00", "[80.5,", "88.6]", "n=300"]
    assert headline_markdown({"eval": []}, ["vanilla"], EPS) == ""


def test_rows_that_differ_only_in_n_show_each_n_once():
    """New-user finding: after evaluating again with a smaller eval.num_examples the summary read
    "90.00 [82.6, 94.5] n=100 (n=100); 80.00 [49.0, 94.3] n=10 (n=10)": the budget repeated the n."""
    rows = [row("dverge", "eval", "worst_case", "Linf", 0.1, 90.0, n=100, budget="n=100"),
            row("dverge", "eval", "worst_case", "Linf", 0.1, 80.0, n=10, budget="n=10"),
            row("dverge", "eval", "worst_case", "Linf", 0.1, 70.0, n=10, budget="steps=5,n=10")]
    (dverge,) = headline_rows({"eval": rows}, ["dverge"], EPS)
    assert dverge[3] == "90.00 [82.6, 94.5] n=100; 80.00 [49.0, 94.3] n=10; 70.00 [39.7, 89.2] n=10 (steps=5)"
