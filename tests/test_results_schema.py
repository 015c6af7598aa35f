"""Issue 26: the results store (dvtrain.results) has a schema, validated before any work; one reader;
results.json and results.md written as one step; results.json files of earlier releases still read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dvtrain import results as store
from dvtrain.report.compare import compare_main

ROW = {"stage": "dverge", "model": "mixture", "attack": "pgd_linf", "norm": "Linf", "eps": 0.1, "budget": "n=100",
       "accuracy": 57.1, "n": 100, "ci_low": 47.0, "ci_high": 66.0, "table": "eval"}
BLACKBOX = {"models": ["sub0", "mixture"], "n_images": 30, "sets": [], "eps": [0.1], "accuracy": [[], []],
            "all": [[50.0], [60.0]]}


def run_with(tmp_path: Path, results: dict | str) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text("name: r\nseed: 0\n")
    (run / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return run


BAD = {
    "accuracy as a string": ({"eval": [ROW | {"accuracy": "57.1"}]}, "eval[0] (dverge mixture pgd_linf Linf) has accuracy \"57.1\""),
    "missing accuracy": ({"eval": [{k: v for k, v in ROW.items() if k != "accuracy"}]}, "eval[0] (dverge mixture pgd_linf Linf) has no accuracy"),
    "blackbox a list": ({"eval": [ROW], "blackbox": []}, "blackbox is a JSON list"),
    "NaN accuracy": ('{"eval": [' + json.dumps(ROW).replace("57.1", "NaN") + "]}", "eval[0] (dverge mixture pgd_linf Linf) has accuracy nan"),
    "NaN in a section": ('{"eval": [], "transfer": {"dverge": {"success": [[NaN]]}}}', "transfer.dverge.success[0][0] holds nan"),
    "accuracy above 100": ({"eval": [ROW | {"accuracy": 157.1}]}, "not a percentage in [0, 100]"),
    "n a string": ({"eval": [ROW | {"n": "100"}]}, "has n \"100\""),
    "row not an object": ({"eval": [3]}, "eval[0] is a JSON int"),
    "blackbox rows short": ({"eval": [ROW], "blackbox": {"dverge": BLACKBOX | {"all": [[50.0]]}}}, "blackbox.dverge.all is not a list of 2 rows"),
    "blackbox value a string": ({"eval": [ROW], "blackbox": {"dverge": BLACKBOX | {"all": [[50.0], ["60"]]}}}, "blackbox.dverge.all[1][0]"),
    "newer schema": ({"schema": 99, "eval": []}, "newer than this dvtrain reads"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_damaged_store_is_refused_with_one_line_naming_the_entry(tmp_path, case):
    results, expected = BAD[case]
    run = run_with(tmp_path, results)
    with pytest.raises(store.ResultsError) as error:
        store.load_results(run)
    message = str(error.value)
    assert "\n" not in message and expected in message and str(run / "results.json") in message


@pytest.mark.parametrize("case", ["accuracy as a string", "NaN accuracy", "blackbox a list"])
def test_compare_refuses_a_damaged_store_with_exit_2(tmp_path, capsys, case):
    run = run_with(tmp_path, BAD[case][0])
    assert compare_main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BAD[case][1] in err[0]


def test_eval_refuses_a_damaged_store_before_any_work(tmp_path, capsys):
    from conftest import TINY
    from dvtrain import cli

    run = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run), *TINY, "stages=[vanilla]", "vanilla.epochs=1", "eval.attacks=[clean]"]) == 0
    results = json.loads((run / "results.json").read_text())
    results["eval"][1]["accuracy"] = "57.1"
    (run / "results.json").write_text(json.dumps(results))
    before = (run / "results.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dvtrain: ")]
    assert len(err) == 1 and "eval[1]" in err[0] and "57.1" in err[0]
    assert (run / "results.json").read_bytes() == before and not (tmp_path / "transfer_cache").exists()


def test_a_file_of_an_earlier_release_is_read_and_written_at_the_current_schema(tmp_path):
    old = {"run": "r", "eval": [{k: v for k, v in ROW.items() if k not in ("table", "budget")}], "stages": {},
           "blackbox": {"dverge": BLACKBOX}, "blackbox_surrogate": {"steps": 20}}
    run = run_with(tmp_path, old)
    results = store.load_results(run)
    assert results["eval"] == old["eval"] and store.SCHEMA_KEY not in results
    store.write_results(run, results, "# md\n")
    written = json.loads((run / "results.json").read_text())
    assert written[store.SCHEMA_KEY] == store.SCHEMA_VERSION and written["eval"] == old["eval"]
    assert (run / "results.md").read_text() == "# md\n"


def test_json_and_markdown_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    run = run_with(tmp_path, {"eval": [ROW]})
    (run / "results.md").write_text("old md")
    before = (run / "results.json").read_text()
    results = store.load_results(run)
    results["eval"][0]["accuracy"] = "bad"  # refused by the validation before either file is touched
    with pytest.raises(store.ResultsError):
        store.write_results(run, results, "new md")
    assert (run / "results.json").read_text() == before and (run / "results.md").read_text() == "old md"
    original = os.replace
    calls = []

    def failing_replace(src, dst):  # the disk fills between the two renames: the markdown first, never the JSON
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(src, dst)

    results["eval"][0]["accuracy"] = 12.5
    monkeypatch.setattr(os, "replace", failing_replace)  # storage.replacing renames with os.replace
    with pytest.raises(OSError):
        store.write_results(run, results, "new md")
    monkeypatch.setattr(os, "replace", original)
    assert calls == ["results.md", "results.json"] and (run / "results.json").read_text() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_a_row_of_another_attack_code_version_is_never_merged_with_the_old_one():
    old = ROW | {"code": "pgd_linf@1"}
    new = ROW | {"code": "pgd_linf@2", "accuracy": 50.0}
    assert store.merge_rows([old], [new]) == [old, new]
    assert store.merge_rows([old], [old | {"accuracy": 1.0}]) == [old | {"accuracy": 1.0}]
    # A row of a release before code versions is the same code as version 1: replaced, not kept beside it.
    legacy = {k: v for k, v in ROW.items() if k != "code"}
    assert store.merge_rows([legacy], [old]) == [old]
    assert store.merge_rows([legacy], [old | {"budget": "n=50"}]) == [legacy, old | {"budget": "n=50"}]
