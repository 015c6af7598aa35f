"""End to end: the CLI trains every stage, writes a valid run directory, refuses to clobber it, and
resumes exactly."""

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY, run_cli
from dvtrain import cli
from dvtrain.train.dverge import Dverge
from dvtrain.config import load_config
from dvtrain.eval.report import results_markdown

ATTACKS = {"clean", "fgsm", "pgd_linf", "pgd_l2", "pgd_linf_margin"}  # the default eval.attacks


def _digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def _weights(run_dir: Path, stage: str) -> dict:
    folder = run_dir / "checkpoints" / stage
    return {f.name: load_file(f) for f in sorted(folder.glob("sub?.safetensors"))}


def test_cli_writes_a_valid_run_and_protects_it(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("--run-dir", str(run_dir), *TINY)
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    cfg = load_config(run_dir / "config.yaml")
    rows = results["eval"]
    assert len(rows) == 3 * 4 * (5 + 2)  # stages × models × (attacks + worst case L∞ and L2)
    for row in rows:
        assert set(row) == {"stage", "model", "attack", "code", "norm", "eps", "budget", "accuracy", "n", "ci_low",
                            "ci_high", "images", "test_split", "table", "command"} | (
            {"of"} if row["attack"] == "worst_case" else set())
        assert row["stage"] in {"vanilla", "dverge", "dverge_advt"} and row["n"] == 64
        assert row["model"] in {"sub0", "sub1", "sub2", "mixture"} and row["attack"] in ATTACKS | {"worst_case"}
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 100.0
        assert row["eps"] == {None: 0.0, "Linf": cfg.eval.eps, "L2": cfg.eval.l2_eps}[row["norm"]]
        images = row["accuracy"] * row["n"] / 100  # a share of the evaluated images
        assert images == pytest.approx(round(images), abs=1e-9)
    assert set(results["stages"]) == {"vanilla", "dverge", "dverge_advt"}
    assert (run_dir / "config.yaml").is_file() and results_markdown(rows) in (run_dir / "results.md").read_text()
    for stage in ("vanilla", "dverge", "dverge_advt"):
        assert sorted(_weights(run_dir, stage)) == ["sub0.safetensors", "sub1.safetensors", "sub2.safetensors"]
    # the table is printed like the report's
    assert "PGD L∞" in done.stdout and "Mixture (plain ensemble)" in done.stdout

    before = _digest(run_dir)
    again = run_cli("--run-dir", str(run_dir), *TINY)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert _digest(run_dir) == before

    changed = run_cli("--run-dir", str(run_dir), "--resume", *TINY, "dverge.eps=0.05")
    assert changed.returncode == 2 and "dverge.eps" in changed.stderr
    assert _digest(run_dir) == before

    resumed = run_cli("--run-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "complete and evaluated; skipping" in resumed.stdout
    assert _digest(run_dir) == before


def test_same_seed_gives_bit_identical_weights(tmp_path):
    for name in ("a", "b"):
        assert cli.train_main(["--run-dir", str(tmp_path / name), *TINY, "stages=[vanilla, dverge]"]) == 0
    for stage in ("vanilla", "dverge"):
        a, b = _weights(tmp_path / "a", stage), _weights(tmp_path / "b", stage)
        assert all(a[f][k].equal(b[f][k]) for f in a for k in a[f])
    other = tmp_path / "c"
    assert cli.train_main(["--run-dir", str(other), *TINY, "stages=[vanilla]", "seed=1"]) == 0
    a, c = _weights(tmp_path / "a", "vanilla"), _weights(other, "vanilla")
    assert not a["sub0.safetensors"]["conv1.weight"].equal(c["sub0.safetensors"]["conv1.weight"])
    # different submodels start from different seeds
    assert not a["sub0.safetensors"]["conv1.weight"].equal(a["sub1.safetensors"]["conv1.weight"])


def test_interrupted_stage_resumes_bit_identically(tmp_path, monkeypatch):
    args = [*TINY, "stages=[vanilla, dverge]", "dverge.epochs=3"]
    assert cli.train_main(["--run-dir", str(tmp_path / "straight"), *args]) == 0

    real_batches = Dverge.batches
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_batches(*a, **k)

    monkeypatch.setattr(Dverge, "batches", interrupted)
    assert cli.train_main(["--run-dir", str(tmp_path / "cut"), *args]) == cli.EXIT_INTERRUPTED
    state = json.loads((tmp_path / "cut" / "checkpoints" / "dverge" / "state.json").read_text())
    assert state["epoch"] == 1 and not state["complete"]
    monkeypatch.setattr(Dverge, "batches", real_batches)
    assert cli.train_main(["--run-dir", str(tmp_path / "cut"), "--resume"]) == 0

    a, b = _weights(tmp_path / "straight", "dverge"), _weights(tmp_path / "cut", "dverge")
    assert all(a[f][k].equal(b[f][k]) for f in a for k in a[f])
    sa = json.loads((tmp_path / "straight" / "checkpoints" / "dverge" / "state.json").read_text())
    sb = json.loads((tmp_path / "cut" / "checkpoints" / "dverge" / "state.json").read_text())
    assert sa["epoch_figures"] == sb["epoch_figures"] and len(sa["epoch_figures"]) == 3
    assert all(1 <= figures["layer"] <= 5 for figures in sa["epoch_figures"])  # the Conv net's layers


def test_dverge_needs_finished_vanilla(tmp_path, capsys):
    assert cli.train_main(["--run-dir", str(tmp_path / "r"), *TINY, "stages=[dverge]"]) == 2
    assert "starts from the final weights of stage vanilla" in capsys.readouterr().err


def test_layer_out_of_range_is_a_clear_error(tmp_path, capsys):
    assert cli.train_main(["--run-dir", str(tmp_path / "r"), *TINY, "dverge.layer=9"]) == 2
    assert "dverge.layer=9 is out of range: conv has layers 1..5" in capsys.readouterr().err


def test_wandb_offline_run_is_written(tmp_path):
    run_dir = tmp_path / "w"
    args = [a for a in TINY if not a.startswith("logging.wandb")]
    assert cli.train_main(["--run-dir", str(run_dir), *args, "stages=[vanilla]", "logging.wandb=offline"]) == 0
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_eval_command_reevaluates_saved_stages(tmp_path):
    run_dir = tmp_path / "e"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]"]) == 0
    small = ["eval.transfer.num_images=40", "eval.transfer.steps=2", "eval.transfer.restarts=1",
             "eval.transfer.blackbox_steps=2", "eval.transfer.blackbox_restarts=1",
             "eval.transfer.surrogate_sizes=[2]", "eval.transfer.surrogate_epochs=1", "eval.transfer.sweep_eps=[0.05]",
             "eval.autoattack.version=custom", "eval.autoattack.attacks=[apgd-ce]", "eval.autoattack.iterations=2",
             "eval.adaptive.steps=2", "eval.checks.long_steps=3",
             "eval.diversity.num_images=20"]
    assert cli.main(["eval", str(run_dir), "eval.eps=0.05", *small]) == 0
    rows = json.loads((run_dir / "results.json").read_text())["eval"]
    assert {r["eps"] for r in rows if r["attack"] == "fgsm" and r["table"] == "eval"} == {0.05}
    assert {r["eps"] for r in rows if r["attack"] == "fgsm" and r["table"] == "train"} == {0.1}  # the training table stays
    assert {r["attack"] for r in rows} >= {"autoattack", "adaptive", "pgd_linf", "pgd_linf_margin", "worst_case"}
    results = json.loads((run_dir / "results.json").read_text())
    assert "vanilla" in results["transfer"] and (run_dir / "results.md").read_text().count("### vanilla") >= 1
    assert results["diversity"]["vanilla"]["n_images"] <= 20
    assert cli.main(["eval", str(run_dir), "dverge.eps=0.1"]) == 2


BASELINES_TINY = [*TINY, "stages=[adp, gal, trs]", "adp.epochs=1", "gal.epochs=1", "trs.epochs=2", "trs.pgd_steps=2",
                  "adp.batch_size=64", "gal.batch_size=64", "trs.batch_size=64", "checkpoint.every_steps=1"]


def test_baseline_stages_train_from_scratch_and_resume_inside_an_epoch_exactly(tmp_path, monkeypatch):
    from dvtrain.train import baselines

    straight = tmp_path / "straight"
    assert cli.train_main(["--run-dir", str(straight), *BASELINES_TINY]) == 0
    results = json.loads((straight / "results.json").read_text())
    assert set(results["stages"]) == {"adp", "gal", "trs"}
    assert {(r["stage"], r["model"]) for r in results["eval"]} == {
        (s, m) for s in ("adp", "gal", "trs") for m in ("sub0", "sub1", "sub2", "mixture")}
    assert not (straight / "checkpoints" / "vanilla").exists()  # from scratch: no vanilla stage needed
    first = {s: _weights(straight, s)["sub0.safetensors"]["conv1.weight"] for s in ("adp", "gal", "trs")}
    assert not first["adp"].equal(first["gal"]) and not first["gal"].equal(first["trs"])

    real_step = baselines.Trs.step
    calls = {"trs": 0}

    def interrupted(*a, **k):
        calls["trs"] += 1
        if calls["trs"] == 6:  # the second step of the second epoch
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(baselines.Trs, "step", interrupted)
    cut = tmp_path / "cut"
    assert cli.train_main(["--run-dir", str(cut), *BASELINES_TINY]) == cli.EXIT_INTERRUPTED
    state = json.loads((cut / "checkpoints" / "trs" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 1)
    monkeypatch.setattr(baselines.Trs, "step", real_step)
    assert cli.train_main(["--run-dir", str(cut), "--resume"]) == 0
    for stage in ("adp", "gal", "trs"):
        a, b = _weights(straight, stage), _weights(cut, stage)
        assert all(a[f][k].equal(b[f][k]) for f in a for k in a[f]), stage

    # a finished stage's settings are fixed; a stage the run has not started yet may be configured freely
    assert cli.train_main(["--run-dir", str(cut), "--resume", "adp.alpha=1.0"]) == 2
    assert cli.train_main(["--run-dir", str(cut), "--resume", "stages=[trs, vanilla]", "vanilla.epochs=1"]) == 0
    assert json.loads((cut / "results.json").read_text())["stages"]["vanilla"]["epochs"] == 1
