"""`dvtrain compare`: run directories, offline W&B runs written here, online groups and runs (dispatch
only: no network), config differences, ε in the headers, --group-by, CSV, the W&B table, the short
default table and its width, the † marks, the plots, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY
from dvtrain import cli
from dvtrain.report import compare
from dvtrain.report.compare import compare_main, shown_label
from dvtrain.report.wandb_reader import read_offline_run
from dvtrain.eval.report import metric_name, result_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ATTACKS = ("clean", "fgsm", "pgd_linf", "pgd_l2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run A logs its vanilla stage to an offline W&B run; run B (another seed) trains two stages without W&B."""
    root = tmp_path_factory.mktemp("compare")
    no_wandb = [o for o in TINY if not o.startswith("logging.wandb")]
    assert cli.train_main(["--run-dir", str(root / "a"), *no_wandb, "logging.wandb=offline", "name=alpha",
                           "stages=[vanilla]"]) == 0
    assert cli.train_main(["--run-dir", str(root / "b"), *TINY, "name=beta", "seed=1", "stages=[vanilla,dverge]"]) == 0
    (offline,) = sorted((root / "a" / "wandb").glob("offline-run-*"))
    return {"a": root / "a", "b": root / "b", "offline": offline}


def mixture(run_dir: Path) -> dict[tuple[str, str], float]:
    rows = json.loads((run_dir / "results.json").read_text())["eval"]
    return {(r["stage"], metric_name(r["attack"], r.get("norm"))): r["accuracy"] for r in rows if r["model"] == "mixture"}


def header(run_dir: Path, stage: str, attack: str, model: str = "mixture") -> str:
    """The column a results.json row lands in: its model, attack and ε (the stage is the row's)."""
    rows = json.loads((run_dir / "results.json").read_text())["eval"]
    (eps,) = {r["eps"] for r in rows if (r["stage"], r["model"], metric_name(r["attack"], r.get("norm"))) == (stage, model, attack)}
    return shown_label((model, attack, eps or None))


def markdown_rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """(run label, stage) → column → cell, from the printed table; a run's name and config values are
    written on its first stage's row only, so they are carried down."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    stage_at = header.index("Stage")
    rows, lead = {}, []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        lead = cells[:stage_at] if cells[0] else lead
        cells[:stage_at] = lead
        rows[(cells[0], cells[stage_at])] = dict(zip(header[1:], cells[1:]))
    return rows


def labels(table: dict) -> list[str]:
    return list(dict.fromkeys(label for label, _ in table))


def test_one_row_per_experiment_and_stage_with_config_differences_and_eps(runs, capsys):
    assert compare_main([str(runs["a"]), str(runs["b"]), str(runs["a"] / "wandb"), "--all"]) == 0
    table = markdown_rows(capsys.readouterr().out)
    # the W&B runs of run A are one experiment, named like the run directory's (so both are named by their argument)
    assert labels(table) == [str(runs["a"]), "beta", str(runs["a"] / "wandb")]
    assert list(table)[1:3] == [("beta", "vanilla"), ("beta", "dverge")]  # stages in training order
    assert (str(runs["a"]), "dverge") not in table  # run A has no dverge stage: no row
    a, b = mixture(runs["a"]), mixture(runs["b"])
    for attack in ATTACKS:
        column = header(runs["a"], "vanilla", attack)
        assert column.endswith("ε=0.1") == (attack in ("fgsm", "pgd_linf"))
        assert table[(str(runs["a"]), "vanilla")][column] == f"{a[('vanilla', attack)]:.2f}"
        # the same numbers via W&B, in the same columns: one metric at one ε is one column
        assert table[(str(runs["a"] / "wandb"), "vanilla")][column] == table[(str(runs["a"]), "vanilla")][column]
        for stage in ("vanilla", "dverge"):
            assert table[("beta", stage)][header(runs["b"], stage, attack)] == f"{b[(stage, attack)]:.2f}"
    # the config keys the runs differ in are columns (name, run dir and logging are not)
    assert table[("beta", "dverge")]["seed"] == "1" and table[(str(runs["a"]), "vanilla")]["seed"] == "0"
    assert table[("beta", "vanilla")]["stages"] == '["vanilla", "dverge"]' and "name" not in table[("beta", "vanilla")]
    assert not any(column.startswith("logging.") for column in table[("beta", "vanilla")])


def test_default_table_is_the_headline_figures(runs, capsys):
    """Without --all: clean and the worst case per norm (ε in the header); the legend says what --all adds."""
    assert compare_main([str(runs["a"]), str(runs["b"])]) == 0
    out = capsys.readouterr().out
    table = markdown_rows(out)
    worst_linf, worst_l2 = header(runs["b"], "dverge", "worst_case_linf"), header(runs["b"], "dverge", "worst_case_l2")
    assert (worst_linf, worst_l2) == ("Worst L∞ ε=0.1", "Worst L2 ε=0.5")
    assert list(table[("beta", "dverge")]) == ["seed", "stages", "Stage", "Clean", worst_linf, worst_l2]
    b = mixture(runs["b"])
    assert table[("beta", "dverge")][worst_linf] == f"{b[('dverge', 'worst_case_linf')]:.2f}"
    assert "more columns (other attacks, models or ε): --all" in out


def test_group_by_seed_gives_mean_and_sd(seed_runs, capsys):
    args = [str(run) for run in seed_runs.values()]
    assert compare_main([*args, "--group-by", "seed", "--all"]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert list(table) == [("seed0, seed1", "vanilla")]
    (row,) = table.values()
    metrics = {m for stage, m in mixture(seed_runs["seed0"]) if stage == "vanilla"}
    assert row["n"] == "2" and row["seed"] == "0, 1" and len(row) == 3 + len(metrics)  # no other config differs
    spread = 0.0
    for attack in ATTACKS:
        values = [mixture(run)[("vanilla", attack)] for run in seed_runs.values()]
        cell = row[header(seed_runs["seed0"], "vanilla", attack)]
        assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        spread += statistics.stdev(values)
    assert spread > 0  # the seeds' numbers differ: the s.d. is of real spread
    # the same from the runs' wandb folders, and without --group-by one row per seed
    assert compare_main([str(run / "wandb") for run in seed_runs.values()]) == 0
    assert labels(markdown_rows(capsys.readouterr().out)) == ["seed0", "seed1"]


def test_csv_holds_the_same_numbers_at_full_precision(runs, tmp_path, capsys):
    out = tmp_path / "cmp.csv"
    assert compare_main([str(runs["a"]), str(runs["b"]), "--submodels", "--all", "--csv", str(out)]) == 0
    printed = markdown_rows(capsys.readouterr().out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["stage"]) for r in rows] == [("alpha", "vanilla"), ("beta", "vanilla"), ("beta", "dverge")]
    numbers = [c for c in printed[("alpha", "vanilla")] if c not in ("seed", "stages", "Stage")]
    assert set(rows[0]) - {"run", "stage", "seed", "stages"} == set(numbers)  # no n, no empty s.d. columns
    assert header(runs["a"], "vanilla", "pgd_l2", "sub2") == "Submodel 3 pgd_l2 ε=0.5" in rows[0]  # --submodels
    for row in rows:
        run = runs["a"] if row["run"] == "alpha" else runs["b"]
        metrics = result_metrics(json.loads((run / "results.json").read_text()))
        expected = {header(run, s, a, m): v for (s, m, a), v in metrics.items() if s == row["stage"]}
        for column in numbers:
            cell = row[column]
            assert (float(cell) if cell else None) == expected.get(column)
            assert printed[(row["run"], row["stage"])][column] == (f"{float(cell):.2f}" if cell else "—")


def test_grouped_csv_has_n_and_sd_columns(seed_runs, tmp_path, capsys):
    out = tmp_path / "cmp.csv"
    assert compare_main([*(str(r) for r in seed_runs.values()), "--group-by", "seed", "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        (row,) = list(csv.DictReader(f))
    values = [mixture(run)[("vanilla", "clean")] for run in seed_runs.values()]
    assert row["n"] == "2" and float(row["Clean"]) == pytest.approx(statistics.mean(values))
    assert float(row["Clean sd"]) == pytest.approx(statistics.stdev(values)) and row["Clean n"] == "2"


def write_run(root: Path, name: str, seed: int, dverge_eps: float, *, of: tuple[str, ...] = ("clean", "fgsm", "pgd_linf"),
              base: float = 50.0, extra_eps: float | None = None, evaluated: bool = True,
              bb_eps: tuple[float, ...] = (0.1,)) -> Path:
    """A run directory as dvtrain writes it (config.yaml, results.json) for all three stages: white-box
    rows (a worst case over `of`; with `extra_eps` also rows at a second ε), and, if `evaluated`, the
    black-box and transfer numbers `dvtrain eval` adds."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(f"name: {name}\nseed: {seed}\ndverge:\n  eps: {dverge_eps}\n"
                                     "dverge_advt:\n  optim:\n    lr: 0.01\n")
    stages = ("vanilla", "dverge", "dverge_advt")
    rows = []
    for k, stage in enumerate(stages):
        value = base + 10 * k + seed
        rows += [{"stage": stage, "model": "mixture", "attack": "clean", "norm": None, "eps": 0.0, "accuracy": 98.0 - seed, "n": 359},
                 {"stage": stage, "model": "mixture", "attack": "worst_case", "norm": "Linf", "eps": 0.1, "accuracy": value,
                  "n": 359, "of": list(of)},
                 {"stage": stage, "model": "mixture", "attack": "worst_case", "norm": "L2", "eps": 0.5, "accuracy": value + 1.5,
                  "n": 359, "of": ["clean", "pgd_l2"]}]
        if extra_eps is not None:
            rows.append({"stage": stage, "model": "mixture", "attack": "worst_case", "norm": "Linf", "eps": extra_eps,
                         "accuracy": value - 20, "n": 359, "of": list(of)})
    results = {"run": name, "eval": rows, "stages": {}}
    if evaluated:
        # The layout of dvtrain.eval.blackbox.blackbox_table: "all" per ε of the sweep.
        results["blackbox_surrogate"] = {"eps": list(bb_eps), "surrogates": [{"size": 3}], "steps": 10, "n_images": 200}
        sets = [{"surrogate": "ens3", "attack": "mi_pgd", "loss": "ce", "eps": e} for e in bb_eps]
        results["blackbox"] = {s: {"models": ["mixture"], "n_images": 200, "sets": sets, "eps": list(bb_eps),
                                   "accuracy": [[80.0 + seed for _ in bb_eps]],
                                   "all": [[77.25 + seed - 10 * (0.1 - e) / 0.05 for e in bb_eps]]} for s in stages}
        results["transfer"] = {s: {"sources": ["sub0", "sub1"], "targets": ["sub0", "sub1", "mixture"], "eps": 0.1,
                                   "steps": 10, "restarts": 1, "n_images": 200,
                                   "success": [[90.0, 10.0 + seed, 5.0], [30.0, 95.0, 8.0]]} for s in stages}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_dvtrain_eval_s_worst_case_replaces_the_training_time_one_as_in_the_headline(tmp_path, capsys):
    """docs/extending.md's example: training's table (3 attacks, n=64) and `dvtrain eval`'s (2 attacks, n=20) both
    hold the L∞ worst case at ε 0.1. results.md's headline shows eval's 10.00; so does compare, though the
    training row covers more attacks. Within one table, the worst case over more attacks still wins."""
    from dvtrain.eval.headline import Headline, headline_rows

    def worst(accuracy: float, n: int, of: list[str], table: str) -> dict:
        return {"stage": "dverge", "model": "mixture", "attack": "worst_case", "norm": "Linf", "eps": 0.1,
                "accuracy": accuracy, "n": n, "of": of, "table": table}

    run = tmp_path / "extending"
    run.mkdir()
    rows = [worst(10.94, 64, ["clean", "fgsm", "pgd_linf"], "train"), worst(10.0, 20, ["clean", "pgd_linf"], "eval"),
            worst(12.5, 20, ["clean"], "eval")]  # a later row of eval's table over fewer attacks: not the worst case
    results = {"run": "extending", "eval": rows}
    (run / "results.json").write_text(json.dumps(results))
    (headline,) = headline_rows(results, ["dverge"], Headline(0.1, 0.5))
    assert headline[1] == "dvtrain eval" and headline[3].startswith("10.00 ") and headline[3].endswith("n=20")
    assert compare_main([str(run)]) == 0
    assert markdown_rows(capsys.readouterr().out)[("extending", "dverge")]["Worst L∞ ε=0.1"] == "10.00"


def test_three_runs_fit_a_160_column_terminal(tmp_path, capsys):
    """Two seeds of one config and one of another, every stage, every headline figure, with and without
    --group-by: no line of the table is wider than 160 characters."""
    runs = [write_run(tmp_path, "seed-zero", 0, 0.07), write_run(tmp_path, "seed-one", 1, 0.07),
            write_run(tmp_path, "other-eps", 0, 0.05)]
    for extra in ([], ["--group-by", "seed"]):
        assert compare_main([*(str(r) for r in runs), *extra]) == 0
        out = capsys.readouterr().out
        table = markdown_rows(out)
        assert len(table) == (2 if extra else 3) * 3
        assert max(len(line) for line in out.splitlines()) <= 160, out
        first = table[(("seed-zero, seed-one" if extra else "seed-zero"), "dverge")]
        assert list(first)[-5:] == ["Clean", "Worst L∞ ε=0.1", "Worst L2 ε=0.5", "BB all ε=0.1", "Transfer↓ ε=0.1"]
    grouped = markdown_rows(out)[("seed-zero, seed-one", "dverge_advt")]
    assert grouped["n"] == "2" and grouped["BB all ε=0.1"] == f"{77.75:.2f} ± {statistics.stdev([77.25, 78.25]):.2f}"
    assert grouped["Transfer↓ ε=0.1"] == f"{20.25:.2f} ± {statistics.stdev([20.0, 20.5]):.2f}"
    assert grouped["dverge.eps"] == "0.07" and markdown_rows(out)[("other-eps", "vanilla")]["dverge.eps"] == "0.05"


def test_options_between_the_runs(tmp_path, capsys):
    """`dvtrain compare RUN1 --all RUN2 --group-by seed RUN3` reads every run, as with the options last."""
    runs = [str(write_run(tmp_path, name, seed, eps)) for name, seed, eps in
            (("seed-zero", 0, 0.07), ("seed-one", 1, 0.07), ("other-eps", 0, 0.05))]
    assert cli.main(["compare", *runs, "--all", "--group-by", "seed"]) == 0
    options_last = capsys.readouterr().out
    assert cli.main(["compare", runs[0], "--all", runs[1], "--group-by", "seed", runs[2]]) == 0
    assert capsys.readouterr().out == options_last
    assert labels(markdown_rows(options_last)) == ["seed-zero, seed-one", "other-eps"]


def test_compare_reads_run_directories_without_torch(tmp_path):
    """`dvtrain compare` of run directories reads JSON and YAML only: torch (seconds to import on a small
    machine), wandb and matplotlib stay unloaded."""
    runs = [str(write_run(tmp_path, "seed-zero", 0, 0.07)), str(write_run(tmp_path, "other-eps", 0, 0.05))]
    code = ("import sys\nfrom dvtrain import cli\ncode = cli.main(sys.argv[1:])\n"
            "print(code, sorted(m for m in ('torch', 'wandb', 'accelerate', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, "compare", *runs], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
    assert labels(markdown_rows(done.stdout)) == ["seed-zero", "other-eps"]


def test_blackbox_all_at_every_eps_of_the_sweep(tmp_path, capsys):
    """results.json's black-box table of the ε sweep ("all" per ε) gives one BB all column per ε."""
    run = write_run(tmp_path, "swept", 0, 0.07, bb_eps=(0.05, 0.1))
    assert compare_main([str(run), "--all"]) == 0
    table = markdown_rows(capsys.readouterr().out)[("swept", "dverge")]
    assert table["BB all ε=0.05"] == "67.25" and table["BB all ε=0.1"] == "77.25"


def test_rows_at_several_eps_are_never_merged(tmp_path, capsys):
    """results.json may hold a metric at several ε: the default table picks one ε per column and names it;
    --all shows each ε in its own column."""
    runs = [write_run(tmp_path, "one", 0, 0.07, extra_eps=0.05), write_run(tmp_path, "two", 1, 0.07)]
    assert compare_main([str(r) for r in runs]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert table[("one", "vanilla")]["Worst L∞ ε=0.1"] == "50.00" and "Worst L∞ ε=0.05" not in table[("one", "vanilla")]
    assert compare_main([*(str(r) for r in runs), "--all"]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert table[("one", "vanilla")]["Worst L∞ ε=0.05"] == "30.00" and table[("two", "vanilla")]["Worst L∞ ε=0.05"] == "—"
    assert table[("one", "vanilla")]["Worst L∞ ε=0.1"] == "50.00"


def test_worst_cases_over_other_attacks_are_marked(tmp_path, capsys):
    """A run evaluated with `dvtrain eval` (AutoAttack in its worst case) beside two that were not: its
    worst-case cells carry †, and a legend line names what each row's worst case covers."""
    runs = [write_run(tmp_path, "plain-a", 0, 0.07), write_run(tmp_path, "plain-b", 1, 0.07),
            write_run(tmp_path, "full", 2, 0.07, of=("clean", "fgsm", "pgd_linf", "autoattack"))]
    assert compare_main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    table = markdown_rows(out)
    assert table[("full", "dverge")]["Worst L∞ ε=0.1"] == "62.00†"
    assert table[("plain-a", "dverge")]["Worst L∞ ε=0.1"] == "60.00"  # the column's common basis: unmarked
    assert not table[("full", "dverge")]["Worst L2 ε=0.5"].endswith("†")  # the L2 worst cases agree
    (note,) = [line for line in out.replace("\n  ", " ").splitlines() if line.startswith("†")]  # L∞, every stage alike
    assert note == ("† Worst L∞ ε=0.1 (vanilla, dverge, dverge_advt) — plain-a, plain-b: worst of clean, fgsm, pgd_linf; "
                    "n=359 | full: worst of clean, fgsm, pgd_linf, autoattack; n=359")


def test_a_group_says_how_many_of_its_runs_have_a_number(tmp_path, capsys):
    runs = [write_run(tmp_path, "s0", 0, 0.07), write_run(tmp_path, "s1", 1, 0.07, evaluated=False)]
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed"]) == 0
    row = markdown_rows(capsys.readouterr().out)[("s0, s1", "dverge")]
    assert row["n"] == "2" and row["BB all ε=0.1"] == "77.25 (n=1)"
    assert row["Clean"] == f"97.50 ± {statistics.stdev([98.0, 97.0]):.2f}"


def test_evaluation_settings_never_split_a_group_nor_become_columns(tmp_path, capsys):
    """A run trained with a plug-in table installed has eval.tables.confidence in its config.yaml, an older one
    has not; one was evaluated on fewer images. The seeds stay one group, no eval.* column is shown (config.yaml
    holds the training config's values, not what `dvtrain eval` used), and the basis marks the cells measured
    on other images."""
    runs = [write_run(tmp_path, "old", 0, 0.07), write_run(tmp_path, "new", 1, 0.07)]
    (runs[0] / "config.yaml").write_text((runs[0] / "config.yaml").read_text() + "eval:\n  num_examples: 359\n")
    (runs[1] / "config.yaml").write_text((runs[1] / "config.yaml").read_text()
                                         + "eval:\n  num_examples: 20\n  tables:\n    confidence:\n      num_images: 15\n")
    results = json.loads((runs[1] / "results.json").read_text())
    for row in results["eval"]:
        row["n"] = 20
    (runs[1] / "results.json").write_text(json.dumps(results))
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed"]) == 0
    out = capsys.readouterr().out
    table = markdown_rows(out)
    assert list(table) == [("old, new", stage) for stage in ("vanilla", "dverge", "dverge_advt")]
    row = table[("old, new", "dverge")]
    assert row["n"] == "2" and not any(column.startswith("eval.") for column in row) and "eval." not in out
    assert row["Worst L∞ ε=0.1"] == "60.00 / 61.00†"  # n=359 and n=20: never one mean
    assert compare_main([str(r) for r in runs]) == 0  # ungrouped: one row each, and still no eval.* column
    assert list(markdown_rows(capsys.readouterr().out)[("new", "vanilla")]) == ["seed", "Stage", "Clean", "Worst L∞ ε=0.1",
                                                                               "Worst L2 ε=0.5", "BB all ε=0.1",
                                                                               "Transfer↓ ε=0.1"]


def test_long_config_keys_are_abbreviated_with_a_legend(tmp_path, capsys):
    runs = [write_run(tmp_path, "x", 0, 0.07), write_run(tmp_path, "y", 0, 0.07)]
    config = runs[1] / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.01", "lr: 0.02"))
    assert compare_main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    assert markdown_rows(out)[("y", "vanilla")]["dverge_advt.….lr"] == "0.02"
    assert "dverge_advt.….lr = dverge_advt.optim.lr" in out


def test_plots_one_figure_per_kind_with_error_bars(tmp_path, capsys):
    """--plot FILE writes FILE_accuracy.png and FILE_transfer.png, each of a readable size."""
    from matplotlib.image import imread

    from dvtrain.figure_style import DPI, MAX_WIDTH_INCHES

    runs = [write_run(tmp_path, "seed-zero", 0, 0.07), write_run(tmp_path, "seed-one", 1, 0.07),
            write_run(tmp_path, "other-eps", 0, 0.05)]
    plot = tmp_path / "cmp.png"
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed", "--plot", str(plot)]) == 0
    capsys.readouterr()
    assert not plot.exists()
    for kind in ("accuracy", "transfer"):
        path = tmp_path / f"cmp_{kind}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width = imread(path).shape[:2]
        assert height >= 400 and width <= MAX_WIDTH_INCHES * DPI  # panels wrap into rows rather than widen


def test_stage_filter_and_the_evaluation_numbers_of_full_evaluation(tmp_path, capsys):
    """A results.json as full_evaluation writes it: black-box and transfer numbers become columns."""
    run = tmp_path / "run"
    run.mkdir()
    results = {
        "run": "gamma",
        "eval": [{"stage": "dverge", "model": "mixture", "attack": "autoattack", "norm": "Linf", "eps": 0.1, "accuracy": 50.0},
                 {"stage": "vanilla", "model": "mixture", "attack": "clean", "eps": 0.0, "accuracy": 99.0}],
        "blackbox": {"dverge": {"attacks": ["mi_pgd", "m_di2_fgsm", "all"], "models": ["sub0", "mixture"],
                                "accuracy": [[70.0, 60.0, 55.0], [80.0, 75.0, 72.5]]}},
        "transfer": {"dverge": {"sources": ["sub0", "sub1"], "targets": ["sub0", "sub1", "mixture"],
                                "success": [[90.0, 10.0, 5.0], [30.0, 95.0, 8.0]]}},
    }
    (run / "results.json").write_text(json.dumps(results))
    assert compare_main([str(run), "--stage", "dverge", "--all"]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert table == {("gamma", "dverge"): {"Stage": "dverge", "autoattack_linf ε=0.1": "50.00", "bb_mi_pgd": "80.00",
                                           "bb_m_di2_fgsm": "75.00", "BB all": "72.50", "Transfer↓": "20.00"}}
    assert compare_main([str(run)]) == 0  # the default table: headline figures only, no autoattack column
    assert markdown_rows(capsys.readouterr().out) == {
        ("gamma", "vanilla"): {"Stage": "vanilla", "Clean": "99.00", "BB all": "—", "Transfer↓": "—"},
        ("gamma", "dverge"): {"Stage": "dverge", "Clean": "—", "BB all": "72.50", "Transfer↓": "20.00"}}


def test_online_groups_and_runs_go_through_the_wandb_api(runs, monkeypatch, capsys):
    class FakeRun:
        def __init__(self, stage: str, clean: float):
            self.name, self.job_type = f"delta-{stage}", stage
            self.config = {"seed": 3, "provenance": {"started": stage}}
            self.summary_metrics = {"eval/clean/mixture": clean, "eval/pgd_linf/mixture": 60.25, "eval/pgd_linf/eps": 0.1,
                                    "eval/table": {"_type": "table-file"}, "test/acc/mixture": 97.0}

    class FakeApi:
        def runs(self, path: str, filters: dict) -> list[FakeRun]:
            assert path == "team/dvtrain"
            return [FakeRun("vanilla", 99.0), FakeRun("dverge", 97.5)] if filters == {"group": "delta"} else []

        def run(self, path: str) -> FakeRun:
            assert path == "team/dvtrain/abc123"
            return FakeRun("dverge", 96.0)

    monkeypatch.setattr(compare, "_wandb_api", FakeApi)
    assert compare_main(["team/dvtrain/delta", "team/dvtrain/abc123", str(runs["b"])]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert labels(table) == ["delta", "abc123", "beta"]
    assert table[("delta", "vanilla")]["Clean"] == "99.00" and table[("delta", "dverge")]["Clean"] == "97.50"  # a group: all its stages
    assert table[("abc123", "dverge")]["Clean"] == "96.00" and ("abc123", "vanilla") not in table
    assert table[("delta", "vanilla")]["seed"] == "3" and table[("beta", "vanilla")]["seed"] == "1"
    assert compare_main(["team/dvtrain/delta", "--all"]) == 0
    assert markdown_rows(capsys.readouterr().out)[("delta", "dverge")]["pgd_linf ε=0.1"] == "60.25"

    def unreachable():
        raise ConnectionError("no network")

    monkeypatch.setattr(compare, "_wandb_api", unreachable)
    assert compare_main(["team/dvtrain/abc123"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "cannot read the W&B group or run team/dvtrain/abc123 (ConnectionError)" in err and "wandb login" in err




def test_wandb_training_and_evaluation_numbers_are_one_column(monkeypatch, capsys):
    """A stage's training run (eval/<metric>/<model> at eval/<metric>/eps) and the `dvtrain eval` run
    (eval/<stage>/<model>/<metric>, ε from its config) name one metric at one ε: one column, the later
    evaluation's number; beside a group evaluated only at training time, the worst case is marked †."""
    def training(stage: str, worst: float):
        return (f"x-{stage}", stage, {"seed": 0, "eval": {"eps": 0.1, "l2_eps": 0.5}},
                {"eval/worst_case_linf/mixture": worst, "eval/worst_case_linf/eps": 0.1, "eval/clean/mixture": 99.0,
                 "eval/clean/eps": 0.0})

    evaluation = ("x-eval", "eval", {"seed": 0, "eval": {"eps": 0.1, "l2_eps": 0.5, "transfer": {"eps": 0.1}}},
                  {"eval/dverge/mixture/worst_case_linf_eps0.1": 62.12, "eval/dverge/mixture/transfer_offdiag_eps0.1": 20.0})

    class FakeRun:
        def __init__(self, name, job_type, config, summary):
            self.name, self.job_type, self.config, self.summary_metrics = name, job_type, config, summary

    class FakeApi:
        def runs(self, path: str, filters: dict) -> list[FakeRun]:
            group = filters["group"]
            own = [training("dverge", 71.87)] + ([evaluation] if group == "evaluated" else [])
            return [FakeRun(*r) for r in own]

    monkeypatch.setattr(compare, "_wandb_api", FakeApi)
    assert compare_main(["team/dvtrain/evaluated", "team/dvtrain/trained", "--all"]) == 0
    out = capsys.readouterr().out
    table = markdown_rows(out)
    worst = [c for c in table[("evaluated", "dverge")] if c.startswith("Worst L∞")]
    assert worst == ["Worst L∞ ε=0.1"]  # one metric, one name, its ε in the header
    assert table[("evaluated", "dverge")]["Worst L∞ ε=0.1"] == "62.12†" and table[("trained", "dverge")]["Worst L∞ ε=0.1"] == "71.87†"
    assert table[("evaluated", "dverge")]["Transfer↓ ε=0.1"] == "20.00"
    assert "evaluated: `dvtrain eval` | trained: the training-time evaluation" in out


def test_wandb_logs_the_table_and_the_chart(runs, tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    args = [str(runs["a"]), str(runs["b"]), "--wandb", "offline", "--wandb-dir", str(tmp_path), "--plot", str(plot)]
    assert compare_main(args) == 0
    printed = markdown_rows(capsys.readouterr().out)
    assert (tmp_path / "cmp_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    (offline,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in read_offline_run(offline) if r["type"] == "history"]
    logged = {k: v for item in history for k, v in item.items()}
    assert logged["compare/table._type"] == "table-file" and logged["compare/accuracy._type"] == "image-file"
    table = json.loads((offline / "files" / logged["compare/table.path"]).read_text())
    assert table["columns"][:4] == ["run", "seed", "stages", "stage"]
    assert [row[0] for row in table["data"]] == ["alpha", "beta", "beta"]
    for row in table["data"]:
        for column, value in zip(table["columns"][4:], row[4:]):
            assert printed[(row[0], row[3])][column] == ("—" if value is None else f"{value:.2f}")


def _fake_wandb(monkeypatch, groups: dict[str, list[tuple]]) -> None:
    class FakeRun:
        def __init__(self, name, job_type, config, summary):
            self.name, self.job_type, self.config, self.summary_metrics = name, job_type, config, summary

    class FakeApi:
        def runs(self, path: str, filters: dict) -> list:
            return [FakeRun(*r) for r in groups[filters["group"]]]

    monkeypatch.setattr(compare, "_wandb_api", FakeApi)


def test_no_wandb_number_is_labelled_with_an_eps_it_was_not_computed_at(monkeypatch, capsys):
    """Issue 26, finding 3: `dvtrain eval RUN --stage dverge eval.l2_eps=0.3` ran no L2 attack; the eval run's
    summary holds the training table's L2 worst case at ε 0.5. It is shown at 0.5, never as "ε=0.3"."""
    from dvtrain.eval.report import eval_summary

    results = {"eval": [
        {"stage": "dverge", "model": "mixture", "attack": "worst_case", "norm": "L2", "eps": 0.5, "accuracy": 41.0, "table": "train"},
        {"stage": "dverge", "model": "mixture", "attack": "worst_case", "norm": "Linf", "eps": 0.1, "accuracy": 30.0, "table": "train"},
        {"stage": "dverge", "model": "mixture", "attack": "worst_case", "norm": "Linf", "eps": 0.1, "accuracy": 25.0, "table": "eval"},
        {"stage": "dverge", "model": "mixture", "attack": "clean", "norm": None, "eps": 0.0, "accuracy": 97.0, "table": "eval"}]}
    summary = eval_summary(results)
    assert summary == {"eval/dverge/mixture/worst_case_l2_eps0.5": 41.0, "eval/dverge/mixture/worst_case_linf_eps0.1": 25.0,
                       "eval/dverge/mixture/clean": 97.0}
    config = {"seed": 0, "eval": {"eps": 0.1, "l2_eps": 0.3}}
    _fake_wandb(monkeypatch, {"new": [("x-eval", "eval", config, summary)],
                              "old": [("y-eval", "eval", config, {"eval/dverge/mixture/worst_case_l2": 41.0})],
                              "plain": [("z-eval", "eval", config, {"eval/dverge/mixture/worst_case_l2_eps0.5": 40.0})]})
    assert compare_main(["team/dvtrain/new", "--all"]) == 0
    row = markdown_rows(capsys.readouterr().out)[("new", "dverge")]
    assert row["Worst L2 ε=0.5"] == "41.00" and not any("0.3" in c for c in row)
    assert row["Worst L∞ ε=0.1"] == "25.00"
    # An eval run of an earlier dvtrain did not record the ε: the config's is shown, and the legend says so.
    assert compare_main(["team/dvtrain/old", "team/dvtrain/plain", "--all"]) == 0
    out = capsys.readouterr().out
    table = markdown_rows(out)
    assert table[("old", "dverge")]["Worst L2 ε=0.3"] == "41.00†" and "ε not recorded with the number" in out.replace("\n  ", " ")


def test_a_group_never_averages_numbers_on_different_bases(tmp_path, capsys):
    """Issue 26, finding 4: two seeds evaluated with surrogates of other epochs give BB all 66.67 and 73.33: a
    group shows both apart with †, never 70.00 ± 4.71; the legend says which rests on what."""
    runs = [write_run(tmp_path, "s0", 0, 0.07), write_run(tmp_path, "s1", 1, 0.07)]
    for run, epochs, value in zip(runs, (3, 5), (66.67, 73.33)):
        results = json.loads((run / "results.json").read_text())
        for table in results["blackbox"].values():
            table["all"] = [[value]]
            table["protocol"] = {"surrogates": [{"size": 3, "epochs": epochs}], "steps": 10, "restarts": 1}
        (run / "results.json").write_text(json.dumps(results))
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed"]) == 0
    out = capsys.readouterr().out
    row = markdown_rows(out)[("s0, s1", "dverge")]
    assert row["BB all ε=0.1"] == "66.67 / 73.33†" and "70.00" not in out
    words = " ".join(out.split())  # (the legend wraps to the terminal)
    assert "of 3 epochs" in words and "of 5 epochs" in words
    # The same basis: averaged as before.
    results = json.loads((runs[1] / "results.json").read_text())
    for table in results["blackbox"].values():
        table["protocol"]["surrogates"][0]["epochs"] = 3
    (runs[1] / "results.json").write_text(json.dumps(results))
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed"]) == 0
    assert markdown_rows(capsys.readouterr().out)[("s0, s1", "dverge")]["BB all ε=0.1"] == "70.00 ± 4.71"
    # Other transfer attacks, or the same attacks with another setting (new-user finding: a step size, and
    # [mi_pgd, noise] against [mi_pgd, fgsm], were averaged): another basis.
    for attacks, settings, expected in [({"mi_pgd": {"step_fraction": 0.02}}, "4e1", "66.67 / 73.33†"),
                                        ({"mi_pgd": {"step_fraction": 0.2}, "sgm": {}}, "9c2", "66.67 / 73.33†"),
                                        (None, None, "70.00 ± 4.71")]:
        for run, stamp in ((runs[0], "ab1"), (runs[1], settings)):
            results = json.loads((run / "results.json").read_text())
            for table in results["blackbox"].values():
                table["protocol"]["attacks"] = {"mi_pgd": {"step_fraction": 0.2}} if stamp == "ab1" else attacks
                table["protocol"]["attack_settings"] = "ab1" if stamp == "ab1" else settings
            (run / "results.json").write_text(json.dumps(results))
        if attacks is None:  # both on one basis again
            for run in runs:
                results = json.loads((run / "results.json").read_text())
                for table in results["blackbox"].values():
                    table["protocol"]["attacks"], table["protocol"]["attack_settings"] = {"mi_pgd": {}}, "ab1"
                (run / "results.json").write_text(json.dumps(results))
        assert compare_main([*(str(r) for r in runs), "--group-by", "seed"]) == 0
        assert markdown_rows(capsys.readouterr().out)[("s0, s1", "dverge")]["BB all ε=0.1"] == expected, attacks


def test_a_group_of_a_full_evaluation_and_training_only_runs_is_never_one_mean(tmp_path, capsys):
    """Issue 26, finding 4: one run's worst case covers AutoAttack, two runs' do not: no "59.89 ± 7.37†"."""
    runs = [write_run(tmp_path, "a", 0, 0.07), write_run(tmp_path, "b", 1, 0.07),
            write_run(tmp_path, "c", 2, 0.07, of=("clean", "fgsm", "pgd_linf", "autoattack"), base=40.0)]
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed", "--csv", str(tmp_path / "g.csv")]) == 0
    row = markdown_rows(capsys.readouterr().out)[("a, b, c", "dverge")]
    assert row["Worst L∞ ε=0.1"] == f"60.50 ± {statistics.stdev([60.0, 61.0]):.2f} / 52.00†"
    with open(tmp_path / "g.csv", newline="") as f:
        dverge = [r for r in csv.DictReader(f) if r["stage"] == "dverge"][0]
    assert dverge["Worst L∞ ε=0.1"] == "60.5 / 52.0" and dverge["Worst L∞ ε=0.1 n"] == "2 / 1"


def test_the_default_blackbox_column_is_at_the_headline_eps(tmp_path, capsys):
    """Issue 26, finding 4: BB all at ε 0.05, 0.1 and 0.15 with the worst case at 0.1: the default column is 0.1."""
    runs = [write_run(tmp_path, "p", 0, 0.07, bb_eps=(0.05, 0.1, 0.15)), write_run(tmp_path, "q", 1, 0.07, bb_eps=(0.1, 0.15))]
    assert compare_main([str(r) for r in runs]) == 0
    row = markdown_rows(capsys.readouterr().out)[("p", "dverge")]
    assert "BB all ε=0.1" in row and "BB all ε=0.15" not in row and "Worst L∞ ε=0.1" in row


def test_plots_mark_other_bases_and_write_one_file_per_transfer_eps(tmp_path, capsys, monkeypatch):
    """Each transfer ε its own file (0.05 and 0.1 overwrote one cmp_transfer.png); bars of a † cell carry †;
    a cell on two bases is two bars."""
    from dvtrain.eval import plots

    runs = [write_run(tmp_path, "a", 0, 0.07), write_run(tmp_path, "b", 1, 0.07),
            write_run(tmp_path, "c", 2, 0.07, of=("clean", "fgsm", "pgd_linf", "autoattack"))]
    results = json.loads((runs[2] / "results.json").read_text())
    for matrix in results["transfer"].values():
        matrix["eps"] = 0.05
    (runs[2] / "results.json").write_text(json.dumps(results))
    drawn = {}
    original = plots.comparison_plots

    def spy(series, kinds, stages, path, marked=frozenset(), separator="_", runs=None):
        drawn.update(series=series, marked=set(marked))
        return original(series, kinds, stages, path, marked, separator, runs)

    monkeypatch.setattr(plots, "comparison_plots", spy)
    plot = tmp_path / "cmp.png"
    assert compare_main([*(str(r) for r in runs), "--all", "--plot", str(plot)]) == 0
    capsys.readouterr()
    assert {p.name for p in tmp_path.glob("cmp_*.png")} == {"cmp_accuracy.png", "cmp_transfer_eps0.05.png",
                                                            "cmp_transfer_eps0.1.png"}
    assert ("c", "dverge", "Worst L∞ ε=0.1") in drawn["marked"] and ("a", "dverge", "Worst L∞ ε=0.1") not in drawn["marked"]
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed", "--plot", str(plot)]) == 0
    capsys.readouterr()
    assert {"a, b, c (basis 1)", "a, b, c (basis 2)"} <= set(drawn["series"])
    assert all(label.endswith(")") for label, *_ in drawn["marked"] if label.startswith("a, b, c"))


def test_plots_say_how_many_runs_a_bar_averages_and_draw_only_accuracies_on_the_accuracy_axis(tmp_path, capsys,
                                                                                             monkeypatch):
    """A group of two seeds of which one has BB all: its bars say "n=1" and the legend what that means, not a
    silent "mean over seeds". A plug-in table's number (any quantity) is not drawn on the accuracy axis: a
    printed line names it. A stage of 14 accuracy columns (--all) is split over panels, no tick labels overlap."""
    from matplotlib.text import Text

    from dvtrain import figure_style as style
    from dvtrain.eval.attacks.registry import attacks
    from dvtrain.eval.tables.contract import Number, Table

    class Agreement(Table):
        name = "agreement"

        def numbers(self, results):
            return [Number(s, "mixture", "agreement", None, v, "n=15", "agreement") for s, v in results["agreement"].items()]

    registered = compare.tables.tables
    monkeypatch.setattr(compare.tables, "tables", lambda: [*registered(), Agreement()])
    figures = {}
    save = style.save
    monkeypatch.setattr(style, "save", lambda fig, path: figures.setdefault(path.name, fig) and save(fig, path))
    runs = [write_run(tmp_path, "s1", 0, 0.07), write_run(tmp_path, "s2", 1, 0.07, evaluated=False)]
    whitebox = [a for a in attacks() if a != "clean"]
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        results["agreement"] = {stage: 91.0 for stage in ("vanilla", "dverge", "dverge_advt")}
        results["eval"] += [{"stage": "dverge", "model": "mixture", "attack": a, "norm": "Linf", "eps": 0.1, "accuracy": 40.0,
                             "n": 359} for a in whitebox]
        (run / "results.json").write_text(json.dumps(results))
    assert compare_main([*(str(r) for r in runs), "--group-by", "seed", "--all", "--plot", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert "not drawn, not known to be accuracies (%): agreement (the table shows them)" in out
    assert markdown_rows(out)[("s1, s2", "dverge")]["agreement"] == "91.00 ± 0.00"  # the table still shows it
    fig = figures["cmp_accuracy.png"]
    assert style.layout_problems(fig) == []
    texts = [t.get_text() for t, _ in style.drawn_texts(fig)]
    assert not any(t.startswith("agreement") for t in texts)
    bars = [t for t in fig.findobj(Text) if t.get_text() == "n=1"]
    assert len(bars) == 3  # BB all of each stage: only s1 has it
    assert "run (n=k: the mean of only k of the row's runs)" in texts
    assert [ax.get_title() for ax in fig.axes] == ["vanilla", "dverge (1/2)", "dverge (2/2)", "dverge_advt"]
    assert style.layout_problems(figures["cmp_transfer.png"]) == []


def test_wandb_logs_each_figure_under_its_own_key(tmp_path, capsys):
    """Transfer at ε 0.05 and 0.1 are two figures and two W&B keys, whatever the --plot file's stem holds."""
    runs = [write_run(tmp_path, "a", 0, 0.07), write_run(tmp_path, "c", 2, 0.07)]
    results = json.loads((runs[1] / "results.json").read_text())
    for matrix in results["transfer"].values():
        matrix["eps"] = 0.05
    (runs[1] / "results.json").write_text(json.dumps(results))
    plot = tmp_path / "my_cmp.png"
    args = [*(str(r) for r in runs), "--all", "--wandb", "offline", "--wandb-dir", str(tmp_path), "--plot", str(plot)]
    assert compare_main(args) == 0
    capsys.readouterr()
    (offline,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in read_offline_run(offline) if r["type"] == "history"]
    images = {k.removesuffix("._type") for item in history for k, v in item.items() if v == "image-file"}
    assert images == {"compare/accuracy", "compare/transfer_eps0.05", "compare/transfer_eps0.1"}


@pytest.mark.parametrize("case", ["missing", "not a run", "corrupt results", "stage absent", "group-by unknown key",
                                  "same name twice"])
def test_errors_are_one_line_and_name_the_fix(runs, tmp_path, capsys, case):
    other = tmp_path / "other"
    other.mkdir()
    args, message = {
        "missing": ([str(tmp_path / "nope")], "does not exist; pass a run directory"),
        "not a run": ([str(other)], "neither a dvtrain run directory"),
        "corrupt results": ([str(other)], "is not valid JSON"),
        "stage absent": ([str(runs["a"]), "--stage", "dverge"], "has no numbers for stage dverge; drop --stage"),
        "group-by unknown key": ([str(runs["a"]), "--group-by", "sed"], "--group-by sed is not a config key"),
        "same name twice": ([str(runs["a"]), str(other)], None),
    }[case]
    if case == "corrupt results":
        (other / "results.json").write_text("{not json")
    if case == "same name twice":
        (other / "results.json").write_text((runs["a"] / "results.json").read_text())
    code = compare_main(args)
    captured = capsys.readouterr()
    if message is None:  # not an error: the arguments label the rows when run names clash
        assert code == 0 and labels(markdown_rows(captured.out)) == [str(runs["a"]), str(other)]
        return
    assert code == cli.EXIT_USER_ERROR
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_a_transferability_number_s_basis_names_its_step_size_and_the_images_drawn():
    """New-user finding: Transfer↓ was averaged over runs evaluated with eval.transfer.step_fraction 0.2 and
    0.02, and over num_images 60 and 80: both are part of its basis now (older results show what they hold)."""
    from dvtrain.eval.tables.transfer import transfer_basis_text

    matrix = {"steps": 10, "step_fraction": 0.2, "restarts": 1, "num_images": 60, "n_images": 57}
    assert transfer_basis_text(matrix) == "10 steps of 0.2·ε, 1 restarts, of the first 60 images"
    assert len({transfer_basis_text(m) for m in (matrix, {**matrix, "step_fraction": 0.02}, {**matrix, "num_images": 80},
                                                 {**matrix, "n_images": 55})}) == 3  # n_images (kept images) is not
    assert transfer_basis_text({"steps": 10, "restarts": 1}) == "10 steps, 1 restarts"


def test_a_run_s_results_json_stands_for_its_run_directory(tmp_path, capsys):
    """New-user finding: `dvtrain compare RUN/results.json` said the file had "no results.json"."""
    run = write_run(tmp_path, "s0", 0, 0.07)
    assert compare_main([str(run)]) == 0
    by_folder = capsys.readouterr().out
    assert compare_main([str(run / "results.json")]) == 0
    assert capsys.readouterr().out == by_folder
