"""results.json accumulates and never collides (issue 22 item 4, issue 21 item 2): rows keyed by
(table, stage, model, attack, norm, ε, budget); another ε or budget adds rows, the same key replaces
its row; writers in several processes all land; results.md keeps every table in training order,
headed by the command that produced it; `compare` reads the newest row per metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from dvtrain import cli
from dvtrain.report.compare import read_run_dir
from dvtrain.eval.report import (
    load_results, merge_rows, result_metrics, result_rows, results_markdown, row_key,
)
from dvtrain.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


def row(stage: str, attack: str, eps: float, accuracy: float, table: str = "eval", budget: str = "n=100",
        model: str = "mixture", command: str = "dvtrain eval RUN") -> dict:
    norm = None if attack == "clean" else "Linf"
    return {"stage": stage, "model": model, "attack": attack, "norm": norm, "eps": eps, "budget": budget,
            "accuracy": accuracy, "n": 100, "ci_low": accuracy - 1, "ci_high": accuracy + 1, "table": table,
            "command": command}


def test_rundir_names_every_path_of_the_layout(tmp_path):
    run = RunDir(tmp_path)
    assert (run.config, run.results_json, run.results_md) == (
        tmp_path / "config.yaml", tmp_path / "results.json", tmp_path / "results.md")
    assert run.checkpoints("dverge") == tmp_path / "checkpoints" / "dverge" and run.checkpoints() == tmp_path / "checkpoints"
    assert (run.plots, run.wandb) == (tmp_path / "plots", tmp_path / "wandb")
    with run.lock():
        with run.lock():  # re-entrant in one process
            assert (tmp_path / ".results.lock").exists()


def test_another_eps_or_budget_adds_rows_and_the_same_key_replaces_its_row():
    first = [row("dverge", "pgd_linf", 0.1, 40.0), row("dverge", "clean", 0.0, 90.0)]
    other_eps = [row("dverge", "pgd_linf", 0.05, 60.0)]
    other_budget = [row("dverge", "pgd_linf", 0.1, 35.0, budget="steps=50,n=100")]
    rows = merge_rows(merge_rows(first, other_eps), other_budget)
    assert len(rows) == 4 and {(r["eps"], r["budget"]) for r in rows if r["attack"] == "pgd_linf"} == {
        (0.1, "n=100"), (0.05, "n=100"), (0.1, "steps=50,n=100")}
    again = merge_rows(rows, [row("dverge", "pgd_linf", 0.1, 41.0)])
    assert len(again) == 4 and [r["accuracy"] for r in again if row_key(r) == row_key(first[0])] == [41.0]
    training = merge_rows(again, [row("dverge", "pgd_linf", 0.1, 41.0, table="train", command="dvtrain train")])
    assert len(training) == 5  # the training-time table keeps its own row


def test_result_metrics_keeps_its_contract_and_result_rows_keeps_both_eps(tmp_path):
    rows = [row("dverge", "pgd_linf", 0.1, 40.0), row("dverge", "pgd_linf", 0.05, 60.0), row("dverge", "clean", 0.0, 90.0)]
    results = {"eval": rows, "stages": {}}
    assert result_metrics(results) == {("dverge", "mixture", "pgd_linf"): 60.0, ("dverge", "mixture", "clean"): 90.0}
    listed = [(r["metric"], r["eps"], r["value"], r["budget"], r["table"]) for r in result_rows(results)]
    assert listed == [("pgd_linf", 0.1, 40.0, "n=100", "eval"), ("pgd_linf", 0.05, 60.0, "n=100", "eval"),
                      ("clean", 0.0, 90.0, "n=100", "eval")]
    (tmp_path / "results.json").write_text(json.dumps(results))
    experiment = read_run_dir(tmp_path)  # `dvtrain compare` reads a store with rows at two ε
    assert experiment.values[("dverge", "mixture", "pgd_linf", 0.05)] == 60.0


def test_results_markdown_keeps_every_table_in_training_order_headed_by_its_command():
    rows = [row("dverge", "clean", 0.0, 80.0, table="train", command="dvtrain train"),
            row("dverge", "pgd_linf", 0.1, 30.0, table="train", command="dvtrain train"),
            row("vanilla", "clean", 0.0, 95.0, table="train", command="dvtrain train"),
            row("vanilla", "pgd_linf", 0.1, 5.0, table="train", command="dvtrain train"),
            row("dverge", "pgd_linf", 0.1, 25.0, command="dvtrain eval RUN", budget="steps=50,n=100"),
            row("dverge", "pgd_linf", 0.05, 55.0, command="dvtrain eval RUN eval.eps=0.05", budget="steps=50,n=100")]
    text = results_markdown(rows, {"dverge": ["pass: a check"]}, trained=["vanilla", "dverge"])
    heads = [line for line in text.splitlines() if line.startswith("### ")]
    assert heads == ["### vanilla", "### dverge", "### dverge"]  # training order; the training table stays
    dverge_train, dverge_eval = text.split("### dverge")[1:]
    assert "`dvtrain train`" in dverge_train and "30.00" in dverge_train and "- pass: a check" not in dverge_train
    assert "`dvtrain eval RUN`" in dverge_eval and "`dvtrain eval RUN eval.eps=0.05`" in dverge_eval
    header = next(line for line in dverge_eval.splitlines() if line.startswith("| Model"))
    assert "PGD L∞ ε=0.1 (%)" in header and "PGD L∞ ε=0.05 (%)" in header  # two ε side by side
    assert "| 25.00 [24.0, 26.0] | 55.00 [54.0, 56.0] |" in dverge_eval and "- pass: a check" in dverge_eval
    assert "- PGD L∞ ε=0.05: steps=50,n=100" in dverge_eval


WRITER = """
import sys, time
from dvtrain.config import Config
from dvtrain.eval.report import update_results
run_dir, stage, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for k in range(count):
    def change(results, k=k):
        time.sleep(0.01)  # widen the read-modify-write window: without the lock, writes would be lost
        results["eval"].append({"stage": stage, "model": "mixture", "attack": "clean", "norm": None, "eps": 0.0,
                                "budget": f"n={k + 1}", "accuracy": 50.0, "n": k + 1, "ci_low": 0.0, "ci_high": 100.0,
                                "table": "eval"})
    update_results(run_dir, Config(), change)
"""


def test_writers_in_two_processes_both_land(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), stage, "15"], env=env)
               for stage in ("vanilla", "dverge")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    rows = load_results(tmp_path)["eval"]
    assert sorted((r["stage"], r["n"]) for r in rows) == sorted((s, k) for s in ("vanilla", "dverge") for k in range(1, 16))
    assert (tmp_path / "results.md").read_text().count("### ") == 2


SMALL = ["eval.transfer.num_images=30", "eval.transfer.steps=1", "eval.transfer.restarts=1",
         "eval.transfer.blackbox_steps=1", "eval.transfer.blackbox_restarts=1", "eval.transfer.surrogate_sizes=[2]",
         "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.05]", "eval.full_attacks=[clean,fgsm,pgd_linf]",
         "eval.checks.enabled=false", "eval.num_examples=40"]


@pytest.mark.slow
def test_two_concurrent_evaluations_of_different_stages_both_land(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla,dverge]"]) == 0
    before = load_results(run_dir)["eval"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # dverge at another ε grid than vanilla (issue 26, finding 1: it was drawn under vanilla's headers).
    other = {"vanilla": [], "dverge": ["eval.transfer.sweep_eps=[0.03,0.05]"]}
    evals = [subprocess.Popen([sys.executable, "-m", "dvtrain.cli", "eval", str(run_dir), *SMALL, *other[stage],
                               "--stage", stage],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for stage in ("vanilla", "dverge")]
    outputs = [e.communicate(timeout=600) for e in evals]
    assert [e.returncode for e in evals] == [0, 0], [err[-2000:] for _, err in outputs]
    results = load_results(run_dir)
    rows = results["eval"]
    assert {r["stage"] for r in rows if r["table"] == "eval"} == {"vanilla", "dverge"}
    assert all(r in rows for r in before)  # the training tables are kept
    assert set(results["transfer"]) == set(results["blackbox"]) == {"vanilla", "dverge"}
    assert sum("training the surrogate ensemble" in out for out, _ in outputs) == 1  # one trained, one loaded the cache
    md = (run_dir / "results.md").read_text()
    stage_tables = [line for line in md.splitlines() if line in ("### vanilla", "### dverge")]
    assert stage_tables == ["### vanilla"] * 2 + ["### dverge"] * 2  # training order; both evaluations landed
    bb = results["blackbox"]
    assert bb["vanilla"]["eps"] == [0.05] and bb["dverge"]["eps"] == [0.03, 0.05]
    assert bb["vanilla"]["protocol"]["eps"] == [0.05] and bb["dverge"]["protocol"]["eps"] == [0.03, 0.05]
    shown = _all_rows(md)
    mixture = [bb[s]["models"].index("mixture") for s in ("vanilla", "dverge")]
    assert shown["vanilla"] == {"all ε=0.05": f"{bb['vanilla']['all'][mixture[0]][0]:.2f}"}
    assert shown["dverge"] == {f"all ε={e:g}": f"{v:.2f}" for e, v in zip([0.03, 0.05], bb["dverge"]["all"][mixture[1]])}


def _bb_table(eps: list[float], mixture_all: list[float], protocol: dict | None) -> dict:
    sets = [{"surrogate": "ens2", "attack": "mi_pgd", "loss": "ce", "eps": e} for e in eps]
    table = {"models": ["sub0", "mixture"], "n_images": 30, "sets": sets, "eps": eps,
             "accuracy": [[50.0] * len(eps), mixture_all], "all": [[50.0] * len(eps), mixture_all],
             "all_by_surrogate": {"ens2": [[50.0] * len(eps), mixture_all]}, "images": "abc"}
    return table | ({"protocol": protocol} if protocol else {})


def _protocol(steps: int, epochs: int, eps: list[float]) -> dict:
    return {"n_images": 30, "images": "abc", "eps": eps, "seed": 0, "cache": "/c", "steps": steps, "restarts": 1,
            "sgm_gamma": 0.2, "di_prob": 0.5, "losses": ["ce"], "notes": [],
            "surrogates": [{"name": "ens2", "size": 2, "seed": 1, "epochs": epochs, "dir": "/c/s", "clean_accuracy": 90.0,
                            "sets": [{"surrogate": "ens2", "attack": "mi_pgd", "loss": "ce", "eps": e} for e in eps],
                            "own_accuracy": [1.0] * len(eps)}]}


def _all_rows(md: str) -> dict[str, list[str]]:
    """Per black-box section: the header cells of its "all" table and the mixture rows under it."""
    out, header = {}, None
    for line in md.splitlines():
        if line.startswith("| Stage | Model | all"):
            header = [c.strip() for c in line.strip("|").split("|")][2:]
        elif header and line.startswith("| ") and "Mixture" in line and "surrogate" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(cells[0], dict(zip(header, cells[2:])))
        elif not line.startswith("|"):
            header = None if line.startswith("##") else header
    return out


def test_each_stage_is_drawn_under_its_own_eps_and_protocol():
    """Issue 26, finding 1: `dvtrain eval --stage vanilla`, then `--stage dverge` at other ε: dverge's ε=0.05
    value sits under "all ε=0.05", never under vanilla's first header; each stage keeps its own protocol."""
    from dvtrain.eval.report import blackbox_protocol, evaluation_markdown

    results = {"blackbox": {"vanilla": _bb_table([0.1, 0.15], [40.0, 20.0], _protocol(20, 3, [0.1, 0.15])),
                            "dverge": _bb_table([0.05, 0.1], [66.67, 55.0], _protocol(20, 3, [0.05, 0.1]))}}
    md = evaluation_markdown(results)
    rows = _all_rows(md)
    assert rows["vanilla"] == {"all ε=0.1": "40.00", "all ε=0.15": "20.00"}
    assert rows["dverge"] == {"all ε=0.05": "66.67", "all ε=0.1": "55.00"}
    assert md.count("## Black-box transfer (protocol") == 2
    # Same ε, other surrogate epochs: still two sections, each saying its own epochs.
    results["blackbox"]["dverge"] = _bb_table([0.1, 0.15], [60.0, 30.0], _protocol(20, 5, [0.1, 0.15]))
    md = evaluation_markdown(results)
    assert md.count("## Black-box transfer (protocol") == 2 and "trained 5 epochs" in md and "trained 3 epochs" in md
    assert blackbox_protocol(results, "dverge")["surrogates"][0]["epochs"] == 5
    # One protocol: one section, as before.
    results["blackbox"]["dverge"] = _bb_table([0.1, 0.15], [60.0, 30.0], _protocol(20, 3, [0.1, 0.15]))
    md = evaluation_markdown(results)
    assert md.count("## Black-box transfer") - md.count("### Black-box transfer") == 1
    assert _all_rows(md) == {"vanilla": {"all ε=0.1": "40.00", "all ε=0.15": "20.00"},
                             "dverge": {"all ε=0.1": "60.00", "all ε=0.15": "30.00"}}


def test_results_of_an_earlier_dvtrain_keep_their_one_global_protocol():
    from dvtrain.eval.report import blackbox_protocol, evaluation_markdown

    old = _protocol(20, 3, [0.1])
    results = {"blackbox": {"vanilla": _bb_table([0.1], [40.0], None)}, "blackbox_surrogate": old}
    assert blackbox_protocol(results, "vanilla") == old
    assert "## Black-box transfer" in evaluation_markdown(results)


def test_a_plugin_table_s_entry_is_dropped_with_its_stage_when_the_stage_is_trained_again(tmp_path):
    """A plug-in table's section (listed by `add_stage_section`) is dropped for a stage whose weights are new,
    like the built-in sections: no number of the old weights stays under the stage's name."""
    from dvtrain import results as store

    run = tmp_path / "run"
    run.mkdir()

    def evaluated(results: dict) -> None:
        results["eval"] = [row("vanilla", "clean", 0.0, 99.0), row("dverge", "clean", 0.0, 98.0)]
        store.add_stage_section(results, "agreement")
        store.add_stage_section(results, "diversity")  # built-in: not listed
        results["agreement"] = {"vanilla": {"agreement": 90.0}, "dverge": {"agreement": 80.0}}

    store.update_results(run, evaluated, lambda results: "")
    assert store.load_results(run)["plugin_sections"] == ["agreement"]
    written = store.record_table(run, "vanilla", [row("vanilla", "clean", 0.0, 97.0)], "train", "dvtrain train", None,
                                 None, lambda results: "")
    assert written["agreement"] == {"dverge": {"agreement": 80.0}}
    assert store.load_results(run)["agreement"] == {"dverge": {"agreement": 80.0}}


@pytest.mark.parametrize("listed", ['"agreement"', '[1]', '["provenance"]', '["eval"]'])
def test_a_damaged_list_of_plugin_sections_is_refused_with_one_line(listed, tmp_path):
    from dvtrain import results as store

    path = tmp_path / "results.json"
    path.write_text(f'{{"schema": 2, "eval": [], "plugin_sections": {listed}}}')
    with pytest.raises(store.ResultsError, match="plugin_sections is not a list of plug-in table names"):
        store.read_results(path)


def test_a_plugin_table_may_not_take_a_name_results_json_uses():
    from dvtrain.eval.tables import registry
    from dvtrain.eval.tables.contract import Table

    for name in ("plots", "provenance", "plugin_sections"):
        table = Table()
        table.name = name
        with pytest.raises(registry.TableRegistryError, match=f"table name '{name}' .* is a key results.json already uses"):
            registry.register(table)
    table = Table()
    table.name = "vanilla"  # a stage's name: its section would read as the stage's (new-user finding)
    with pytest.raises(registry.TableRegistryError, match="table name 'vanilla' .* is the name of a stage; rename the table"):
        registry.register(table)


def test_a_table_with_settings_registered_in_one_process_is_refused():
    """The configuration finds a plug-in table's settings (eval.tables.NAME) through entry points, so a table
    with settings registered by register() would run without its section: refused, naming the fix."""
    from dataclasses import dataclass

    from dvtrain.eval.tables import registry
    from dvtrain.eval.tables.contract import Table

    @dataclass
    class Settings:
        num_images: int = 0

    table = Table()
    table.name, table.settings = "in_process_with_settings", Settings
    with pytest.raises(registry.TableRegistryError, match="declares settings but is registered by register\\(\\); publish it "
                                                          "as an entry point of group dvtrain.tables"):
        registry.register(table)
    assert "in_process_with_settings" not in [t.name for t in registry.tables()]


def test_training_a_stage_again_drops_every_number_and_figure_link_of_its_old_weights(tmp_path):
    """The stage loop's store update (not only `record_table`): a plug-in table's entry goes even where the
    plug-in is not installed at training time (the store lists its section), the stage's "plots" entry goes,
    other stages no longer link a figure that also showed it (the black-box figure), and results.md's figure
    line links only what results.json names, plus the loss curves; the figure files themselves stay."""
    import shutil

    from dvtrain import results as store

    run = tmp_path / "run"
    args = ["--run-dir", str(run), *TINY, "stages=[vanilla, dverge]"]
    assert cli.train_main(args) == 0
    plots = RunDir(run).plots
    for name in ("transfer_dverge.png", "transfer_vanilla.png", "blackbox_all.png", "agreement.png"):
        shutil.copy(plots / "vanilla_loss.png", plots / name)  # stand-ins for the figures `dvtrain eval` draws

    def evaluated(results: dict) -> None:  # what `dvtrain eval` with a plug-in table leaves behind
        store.add_stage_section(results, "agreement")
        results["agreement"] = {"vanilla": {"agreement": 90.0}, "dverge": {"agreement": 80.0}}
        results["plots"] = {stage: {"transfer": f"plots/transfer_{stage}.png", "blackbox": "plots/blackbox_all.png",
                                    "agreement": "plots/agreement.png"} for stage in ("vanilla", "dverge")}

    store.update_results(run, evaluated, lambda results: "")
    shutil.rmtree(RunDir(run).checkpoints("dverge"))  # train dverge again, from vanilla's weights
    assert cli.train_main(["--run-dir", str(run), "--resume"]) == 0
    results = store.load_results(run)
    assert results["agreement"] == {"vanilla": {"agreement": 90.0}}
    assert results["plots"] == {"vanilla": {"transfer": "plots/transfer_vanilla.png"}}
    links = next(line for line in RunDir(run).results_md.read_text().splitlines() if line.startswith("Figures:"))
    assert "transfer_vanilla.png" in links and "vanilla_loss.png" in links and "dverge_loss.png" in links
    assert "transfer_dverge.png" not in links and "blackbox_all.png" not in links and "agreement.png" not in links
    assert (plots / "transfer_dverge.png").is_file() and (plots / "blackbox_all.png").is_file()
