"""`dvtrain compare`: run directories, offline W&B runs written here, online groups and runs (dispatch
only: no network), config differences, ε in the headers, --group-by, CSV, the W&B table, and one-line errors."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from conftest import TINY
from dvtrain import cli
from dvtrain.eval import compare
from dvtrain.eval.compare import column_label, compare_main
from dvtrain.tracking import read_offline_run
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
    """The column a results.json row lands in: stage, attack and its ε."""
    rows = json.loads((run_dir / "results.json").read_text())["eval"]
    (eps,) = {r["eps"] for r in rows if (r["stage"], r["model"], metric_name(r["attack"], r.get("norm"))) == (stage, model, attack)}
    return column_label((stage, model, attack, eps))


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """Run label → column → cell, from the printed table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_one_row_per_experiment_with_all_stages_config_differences_and_eps(runs, capsys):
    assert compare_main([str(runs["a"]), str(runs["b"]), str(runs["a"] / "wandb")]) == 0
    table = markdown_rows(capsys.readouterr().out)
    # the W&B runs of run A are one row, named like the run directory's (so both are named by their argument)
    assert list(table) == [str(runs["a"]), "beta", str(runs["a"] / "wandb")]
    a, b = mixture(runs["a"]), mixture(runs["b"])
    for attack in ATTACKS:
        column = header(runs["a"], "vanilla", attack)
        assert column.endswith("ε=0.1") == (attack in ("fgsm", "pgd_linf"))
        assert table[str(runs["a"])][column] == f"{a[('vanilla', attack)]:.2f}"
        assert table[str(runs["a"] / "wandb")][column] == table[str(runs["a"])][column]  # the same numbers via W&B
        assert table[str(runs["a"])][header(runs["b"], "dverge", attack)] == "—"  # run A has no dverge stage
        for stage in ("vanilla", "dverge"):
            assert table["beta"][header(runs["b"], stage, attack)] == f"{b[(stage, attack)]:.2f}"
    # the config keys the runs differ in are columns (name, run dir and logging are not)
    assert table["beta"]["seed"] == "1" and table[str(runs["a"])]["seed"] == "0"
    assert table["beta"]["stages"] == '["vanilla", "dverge"]' and "name" not in table["beta"]
    assert not any(column.startswith("logging.") for column in table["beta"])


def test_group_by_seed_gives_mean_and_sd(seed_runs, capsys):
    args = [str(run) for run in seed_runs.values()]
    assert compare_main([*args, "--group-by", "seed"]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert list(table) == ["seed0, seed1"]
    (row,) = table.values()
    metrics = {m for stage, m in mixture(seed_runs["seed0"]) if stage == "vanilla"}
    assert row["n"] == "2" and row["seed"] == "0, 1" and len(row) == 2 + len(metrics)  # no other config differs
    spread = 0.0
    for attack in ATTACKS:
        values = [mixture(run)[("vanilla", attack)] for run in seed_runs.values()]
        cell = row[header(seed_runs["seed0"], "vanilla", attack)]
        assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        spread += statistics.stdev(values)
    assert spread > 0  # the seeds' numbers differ: the s.d. is of real spread
    # the same from the runs' wandb folders, and without --group-by one row per seed
    assert compare_main([str(run / "wandb") for run in seed_runs.values()]) == 0
    assert set(markdown_rows(capsys.readouterr().out)) == {"seed0", "seed1"}


def test_csv_holds_the_same_numbers_at_full_precision(runs, tmp_path, capsys):
    out = tmp_path / "cmp.csv"
    assert compare_main([str(runs["a"]), str(runs["b"]), "--submodels", "--csv", str(out)]) == 0
    printed = markdown_rows(capsys.readouterr().out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["alpha", "beta"]
    numbers = [c for c in printed["alpha"] if c not in ("seed", "stages")]
    assert {c for c in rows[0] if not c.endswith(" sd")} - {"run", "n", "seed", "stages"} == set(numbers)
    assert header(runs["a"], "vanilla", "pgd_l2", "sub2") in rows[0]  # --submodels adds every model's columns
    for row, run in zip(rows, (runs["a"], runs["b"])):
        metrics = result_metrics(json.loads((run / "results.json").read_text()))
        expected = {header(run, s, a, m): v for (s, m, a), v in metrics.items()}
        for column in numbers:
            cell = row[column]
            assert (float(cell) if cell else None) == expected.get(column)
            assert printed[row["run"]][column] == (f"{float(cell):.2f}" if cell else "—")


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
    assert compare_main([str(run), "--stage", "dverge"]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert table == {"gamma": {"dverge autoattack_linf ε=0.1": "50.00", "dverge bb_mi_pgd": "80.00", "dverge bb_m_di2_fgsm": "75.00",
                               "dverge bb_all": "72.50", "dverge transfer_offdiag": "20.00"}}


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
    group, run = table["delta"], table["abc123"]
    assert group["vanilla clean"] == "99.00" and group["dverge clean"] == "97.50"  # a group: all its stages in one row
    assert group["dverge pgd_linf ε=0.1"] == "60.25" and run["dverge clean"] == "96.00" and run["vanilla clean"] == "—"
    assert group["seed"] == "3" and table["beta"]["seed"] == "1"

    def unreachable():
        raise ConnectionError("no network")

    monkeypatch.setattr(compare, "_wandb_api", unreachable)
    assert compare_main(["team/dvtrain/abc123"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "cannot read the W&B group or run team/dvtrain/abc123 (ConnectionError)" in err and "wandb login" in err


def test_wandb_logs_the_table_and_the_chart(runs, tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    args = [str(runs["a"]), str(runs["b"]), "--wandb", "offline", "--wandb-dir", str(tmp_path), "--plot", str(plot)]
    assert compare_main(args) == 0
    printed = markdown_rows(capsys.readouterr().out)
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    (offline,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in read_offline_run(offline) if r["type"] == "history"]
    logged = {k: v for item in history for k, v in item.items()}
    assert logged["compare/table._type"] == "table-file" and logged["compare/chart._type"] == "image-file"
    table = json.loads((offline / "files" / logged["compare/table.path"]).read_text())
    assert table["columns"][:3] == ["run", "seed", "stages"] and [row[0] for row in table["data"]] == ["alpha", "beta"]
    for row in table["data"]:
        for column, value in zip(table["columns"][3:], row[3:]):
            assert printed[row[0]][column] == ("—" if value is None else f"{value:.2f}")


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
        assert code == 0 and list(markdown_rows(captured.out)) == [str(runs["a"]), str(other)]
        return
    assert code == cli.EXIT_USER_ERROR
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
