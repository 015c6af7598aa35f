"""An evaluation table and two attacks defined outside dvtrain (tests/plugins/dvtrain_extras_*.py, registered by
the entry points of tests/plugins/dvtrain_extras-1.0.dist-info) are evaluated like the built-in ones: the
table's entries land in results.json, its section in results.md, its number in `dvtrain compare --all` and
in the W&B summary; the white-box attack runs in the white-box table and the ε sweep, the transfer attack
in the black-box protocol, each from its record alone. Nothing in dvtrain/ names any of them."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from dvtrain import cli
from dvtrain.report.wandb_reader import offline_run_info, read_offline_run

PLUGINS = REPO / "tests" / "plugins"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
DVTRAIN = [sys.executable, "-c", "import sys; from dvtrain.cli import main; sys.exit(main())"]
SMALL = ["eval.transfer.num_images=20", "eval.transfer.steps=1", "eval.transfer.restarts=1",
         "eval.transfer.blackbox_steps=1", "eval.transfer.blackbox_restarts=1", "eval.transfer.surrogate_sizes=[2]",
         "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.05]", "eval.transfer.blackbox_losses=[ce]",
         "eval.checks.long_steps=2", "eval.diversity.num_images=20", "eval.num_examples=20",
         # the plug-in attacks, named like built-in ones
         "eval.full_attacks=[clean,pgd_linf,bim_linf]", "eval.transfer.sweep_attacks=[pgd_linf,bim_linf]",
         "eval.transfer.blackbox_attacks=[mi_pgd,fgsm_transfer]",
         "eval.tables.agreement.num_images=15"]  # the plug-in table's own setting (its `settings` dataclass)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("extras") / "run"
    args = [o for o in TINY if not o.startswith("logging.wandb")] + ["stages=[vanilla]", "logging.wandb=offline"]
    assert cli.train_main(["--run-dir", str(run_dir), *args]) == 0
    done = subprocess.run([*DVTRAIN, "eval", str(run_dir), *SMALL], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


def test_the_plugin_table_lands_in_results_json_md_compare_and_wandb(evaluated):
    run_dir, printed = evaluated
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["agreement"]["vanilla"]
    assert entry["n_images"] == 15 and 0.0 <= entry["agreement"] <= 100.0  # eval.tables.agreement.num_images
    md = (run_dir / "results.md").read_text()
    assert "## Submodel agreement" in md and f"| vanilla | 15 | {entry['agreement']:.2f} |" in md
    # Its figure is recorded and linked like the built-in ones; its section is listed, so that training
    # the stage again drops it with the built-in sections (dvtrain.results.add_stage_section).
    assert results["plots"]["vanilla"]["agreement"] == "plots/agreement.png" and (run_dir / "plots" / "agreement.png").is_file()
    assert "(plots/agreement.png)" in md.split("## ", 2)[1]  # the summary's figure links
    assert results["plugin_sections"] == ["agreement"]
    # The console ends with the closing block (issue 29, item 1): where the tables are, how to upload the W&B run.
    assert "[eval] done: vanilla" in printed and f"every table, its budgets and checks: {run_dir / 'results.md'}" in printed
    assert f"upload it with: wandb sync {run_dir / 'wandb'}/offline-run-" in printed
    compared = subprocess.run([*DVTRAIN, "compare", str(run_dir), "--all"], env=ENV, cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    header = next(line for line in compared.stdout.splitlines() if line.startswith("|"))
    assert "agreement" in header and f"{entry['agreement']:.2f}" in compared.stdout
    (offline,) = [p for p in (run_dir / "wandb").glob("offline-run-*")
                  if offline_run_info(read_offline_run(p)).job_type == "eval"]
    summary = offline_run_info(read_offline_run(offline)).summary
    assert summary["eval/vanilla/mixture/agreement"] == entry["agreement"]


def test_the_plugin_attacks_run_in_the_white_box_table_the_sweep_and_the_black_box_protocol(evaluated):
    run_dir, _ = evaluated
    results = json.loads((run_dir / "results.json").read_text())
    bim = {r["model"]: r for r in results["eval"] if r["attack"] == "bim_linf" and r["table"] == "eval"}
    assert set(bim) == {"sub0", "sub1", "sub2", "mixture"}
    assert all(r["code"] == "bim_linf@1" and r["budget"].startswith("steps=2,step=") and r["n"] == 20 for r in bim.values())
    worst = next(r for r in results["eval"] if r["attack"] == "worst_case" and r["model"] == "mixture" and r["table"] == "eval")
    assert "bim_linf" in worst["of"] and worst["accuracy"] <= bim["mixture"]["accuracy"]
    sweep = results["eps_sweep"]["vanilla"]
    assert sweep["of"]["sub0"] == ["pgd_linf", "bim_linf"] and all(v is not None for v in sum(sweep["attacks"]["bim_linf"], []))
    blackbox = results["blackbox"]["vanilla"]
    assert {s["attack"] for s in blackbox["sets"]} == {"mi_pgd", "fgsm_transfer"}
    md = (run_dir / "results.md").read_text()
    assert "BIM L∞ ε=0.1 (%)" in md and "BIM:" in md and "ens2 FGSM CE" in md
    # The protocol's description names the attacks that ran, each with its settings (new-user finding: it
    # named the paper's three whatever ran); the numbers' basis names them and a hash of every setting.
    described = next(line for line in md.splitlines() if line.startswith("Accuracy (%) on 20 test images"))
    assert "with momentum PGD (steps 1, runs 1, step_fraction 0.2, " in described and "; FGSM (steps 1, runs 1)" in described
    assert "SGM" not in described and "M-DI²-FGSM" not in described
    assert blackbox["protocol"]["attacks"].keys() == {"mi_pgd", "fgsm_transfer"} and blackbox["protocol"]["attack_settings"]


def test_an_unknown_attack_name_is_refused_before_any_work_with_the_closest_one(evaluated, tmp_path):
    run_dir, _ = evaluated
    done = subprocess.run([*DVTRAIN, "eval", str(run_dir), "eval.full_attacks=[clean,bim_linff]"], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "eval.full_attacks: unknown attack 'bim_linff'" in done.stderr
    assert "did you mean 'bim_linf'?" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _print_config(*overrides, plugins=True):
    env = ENV if plugins else {**ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run([*DVTRAIN, "train", "--print-config", *overrides], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_plugin_table_s_settings_are_a_config_section_typed_ranged_and_checked_before_work():
    """eval.tables.agreement comes from the plug-in's `settings` dataclass: shown by --print-config at its
    default, overridden on the command line, its range and key names checked in one line (exit 2), and named
    as needing its package where the plug-in is not installed."""
    shown = _print_config()
    assert shown.returncode == 0 and "  tables:\n    agreement:\n      num_images: 0\n" in shown.stdout
    assert "      num_images: 7\n" in _print_config("eval.tables.agreement.num_images=7").stdout
    for override, message in [
        ("eval.tables.agreement.num_images=-1", "eval.tables.agreement.num_images=-1 must be >= 0"),
        ("eval.tables.agreement.num_images=many", "config key 'eval.tables.agreement.num_images' must be of type int"),
        ("eval.tables.agreemnt.num_images=3", "unknown config key 'eval.tables.agreemnt'; did you mean 'eval.tables.agreement'?"),
        ("eval.tables.agreement.num_imgs=3", "did you mean 'eval.tables.agreement.num_images'?"),
        ("eval.tables.agreement=3", "config key 'eval.tables.agreement' is a section, got 3"),
    ]:
        done = _print_config(override)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (override, done.stderr)
    missing = _print_config("eval.tables.agreement.num_images=3", plugins=False)
    assert missing.returncode == 2 and "unknown config key 'eval.tables.agreement'" in missing.stderr
    assert "needs the package that registers it (entry point group dvtrain.tables)" in missing.stderr


def test_compare_reads_a_plugin_number_from_w_and_b_without_inventing_an_eps():
    from dvtrain.report.compare import metric_at_eps

    config = {"eval.eps": 0.1, "eval.l2_eps": 0.5, "eval.transfer.eps": 0.1}
    assert metric_at_eps("agreement", config) == ("agreement", None, True)  # it has no ε: none is taken from the config
    assert metric_at_eps("pgd_linf", config) == ("pgd_linf", 0.1, False)  # an earlier release's name: the config's, marked


@pytest.mark.parametrize("entry_point, message", [
    ("agreement = dvtrain_no_such_module:TABLE", "the entry point agreement = dvtrain_no_such_module:TABLE of group "
                                                "dvtrain.tables cannot be loaded (ModuleNotFoundError"),
    ("concord = dvtrain_extras_table:TABLE", "of group dvtrain.tables must name a Table called 'concord'"),
])
def test_a_broken_plugin_table_is_one_line_before_anything_else(entry_point, message, tmp_path):
    """New-user finding: a misnamed plug-in table was refused after the reduced-budget banner (two lines).
    A plug-in that cannot be loaded, or names no Table of its name, is the only line `dvtrain eval` prints."""
    run_dir = tmp_path / "run"
    args = [o for o in TINY if not o.startswith("logging.wandb")] + ["stages=[vanilla]", "logging.wandb=disabled"]
    assert cli.train_main(["--run-dir", str(run_dir), *args]) == 0
    package = tmp_path / "site" / "dvtrain_broken-1.0.dist-info"
    package.mkdir(parents=True)
    (package / "METADATA").write_text("Metadata-Version: 2.1\nName: dvtrain-broken\nVersion: 1.0\n")
    (package / "entry_points.txt").write_text(f"[dvtrain.tables]\n{entry_point}\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS), str(tmp_path / "site")])}
    done = subprocess.run([*DVTRAIN, "eval", str(run_dir), "eval.num_examples=8"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
