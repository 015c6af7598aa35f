"""`dvtrain compare`: run directories, an offline W&B run written here, online run paths (dispatch
only: no network), CSV, the W&B table, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import TINY
from dvtrain import cli
from dvtrain.eval import compare
from dvtrain.eval.compare import compare_main
from dvtrain.tracking import read_offline_run
from dvtrain.eval.report import result_metrics

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
    return {(r["stage"], r["attack"]): r["accuracy"] for r in rows if r["model"] == "mixture"}


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """Run label → column → cell, from the printed table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_compare_reads_run_dirs_and_an_offline_wandb_run(runs, capsys):
    assert compare_main([str(runs["a"]), str(runs["b"]), str(runs["offline"])]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert list(table) == ["alpha", "beta", "alpha-vanilla"]
    a, b = mixture(runs["a"]), mixture(runs["b"])
    for attack in ATTACKS:
        assert table["alpha"][f"vanilla {attack}"] == f"{a[('vanilla', attack)]:.2f}"
        assert table["alpha-vanilla"][f"vanilla {attack}"] == table["alpha"][f"vanilla {attack}"]  # same numbers via W&B
        assert table["alpha"][f"dverge {attack}"] == "—"  # run A has no dverge stage
        for stage in ("vanilla", "dverge"):
            assert table["beta"][f"{stage} {attack}"] == f"{b[(stage, attack)]:.2f}"


def test_csv_holds_the_same_numbers_at_full_precision(runs, tmp_path, capsys):
    out = tmp_path / "cmp.csv"
    assert compare_main([str(runs["a"]), str(runs["b"]), "--submodels", "--csv", str(out)]) == 0
    printed = markdown_rows(capsys.readouterr().out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["alpha", "beta"]
    assert set(rows[0]) - {"run"} == set(printed["alpha"])
    assert "vanilla sub2 pgd_l2" in rows[0]  # --submodels adds every model's columns
    for row, run in zip(rows, (runs["a"], runs["b"])):
        expected = {f"{s} {a}" if m == "mixture" else f"{s} {m} {a}": v
                    for (s, m, a), v in result_metrics(json.loads((run / "results.json").read_text())).items()}
        for column, cell in row.items():
            if column == "run":
                continue
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
    assert table == {"gamma": {"dverge autoattack_linf": "50.00", "dverge bb_mi_pgd": "80.00", "dverge bb_m_di2_fgsm": "75.00",
                               "dverge bb_all": "72.50", "dverge transfer_offdiag": "20.00"}}


def test_online_runs_go_through_the_wandb_api(runs, monkeypatch, capsys):
    class FakeRun:
        name, job_type = "delta-dverge", "dverge"
        summary_metrics = {"eval/mixture/clean": 97.5, "eval/mixture/pgd_linf": 60.25, "eval/table": {"_type": "table-file"},
                           "test/acc/mixture": 97.0}

    class FakeApi:
        def run(self, path: str) -> FakeRun:
            assert path == "team/dvtrain/abc123"
            return FakeRun()

    monkeypatch.setattr(compare, "_wandb_api", FakeApi)
    assert compare_main(["team/dvtrain/abc123", str(runs["b"])]) == 0
    table = markdown_rows(capsys.readouterr().out)
    assert table["delta-dverge"]["dverge clean"] == "97.50" and table["delta-dverge"]["dverge pgd_linf"] == "60.25"
    assert table["delta-dverge"]["vanilla clean"] == "—"

    def unreachable():
        raise ConnectionError("no network")

    monkeypatch.setattr(compare, "_wandb_api", unreachable)
    assert compare_main(["team/dvtrain/abc123"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "cannot read the W&B run team/dvtrain/abc123 (ConnectionError)" in err and "wandb login" in err


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
    assert table["columns"][0] == "run" and [row[0] for row in table["data"]] == ["alpha", "beta"]
    for row in table["data"]:
        for column, value in zip(table["columns"][1:], row[1:]):
            assert printed[row[0]][column] == ("—" if value is None else f"{value:.2f}")


@pytest.mark.parametrize("case", ["missing", "not a run", "corrupt results", "stage absent", "same name twice"])
def test_errors_are_one_line_and_name_the_fix(runs, tmp_path, capsys, case):
    other = tmp_path / "other"
    other.mkdir()
    args, message = {
        "missing": ([str(tmp_path / "nope")], "does not exist; pass a run directory"),
        "not a run": ([str(other)], "neither a dvtrain run directory"),
        "corrupt results": ([str(other)], "is not valid JSON"),
        "stage absent": ([str(runs["a"]), "--stage", "dverge"], "has no numbers for stage dverge; drop --stage"),
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
