"""Issue 19, kind 6: every name dvtrain hands to W&B is valid for W&B, and an artifact W&B does not take
costs neither the stage nor the later ones; --resume uploads it then."""

from __future__ import annotations

import re

import pytest

from conftest import TINY
from dvtrain import cli, checkpoint
from dvtrain.rundir import RunDir
from dvtrain.report.wandb_reader import offline_run_info, read_offline_run
from dvtrain.tracking import ARTIFACT_NAME_MAX, fit_name

VALID_ARTIFACT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
LONG = "x" * 125
CASES = {  # name, stage → what W&B must get
    "short ASCII name unchanged": ("quickstart", "-dverge", "quickstart-dverge"),
    "125 characters + stage": (LONG, "-dverge_advt", None),
    "non-ASCII letters": ("Übung-δ-北京", "-vanilla", None),
    "slash and spaces": ("a/b c", "-vanilla", None),
    "exactly the limit": ("y" * (ARTIFACT_NAME_MAX - 8), "-vanilla", "y" * (ARTIFACT_NAME_MAX - 8) + "-vanilla"),
    "one over the limit": ("y" * (ARTIFACT_NAME_MAX - 7), "-vanilla", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_artifact_names_are_valid_keep_the_stage_and_stay_distinct(case):
    name, stage, expected = CASES[case]
    fitted = fit_name(name, ARTIFACT_NAME_MAX, keep=stage, ascii_only=True)
    assert VALID_ARTIFACT.fullmatch(fitted) and fitted.endswith(stage)
    assert expected is None or fitted == expected
    assert fit_name(name + "z", ARTIFACT_NAME_MAX, keep=stage, ascii_only=True) != fitted  # no two runs share one


def test_run_names_keep_non_ascii_letters_within_the_length_limit():
    assert fit_name("Übung-δ", 128, keep="-dverge") == "Übung-δ-dverge"  # W&B shows any letter in run names
    long = fit_name("é" * 200, 128, keep="-dverge")
    assert len(long) == 128 and long.endswith("-dverge")


def _artifacts(run_dir):
    found = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        records = read_offline_run(folder)
        info = offline_run_info(records)
        found += [(info.job_type, r["artifact"]["name"]) for r in records if r["type"] == "artifact"
                  and r["artifact"]["type"] == "model"]
    return found


ARGS = [o for o in TINY if not o.startswith("logging.wandb")] + [
    "stages=[vanilla, dverge]", "vanilla.epochs=1", "data.train_limit=128", "eval.num_examples=16",
    "logging.wandb=offline", "logging.artifacts=true"]


def test_a_long_non_ascii_name_reaches_wandb_and_every_stage_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    name = "Übung-δ-" + "x" * 117  # 125 characters, non-ASCII letters
    run_dir = tmp_path / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *ARGS, f"name={name}"]) == 0
    found = _artifacts(run_dir)
    # two W&B runs started in the same second sort by their random ids: the order of the folders says nothing
    assert sorted(stage for stage, _ in found) == ["dverge", "vanilla"]
    for stage, artifact in found:
        assert VALID_ARTIFACT.fullmatch(artifact) and artifact.endswith(f"-{stage}"), artifact
    groups = {offline_run_info(read_offline_run(f)).group for f in (run_dir / "wandb").glob("offline-run-*")}
    assert groups == {name}


def test_an_artifact_wandb_refuses_is_a_warning_and_resume_uploads_it(tmp_path, monkeypatch, capsys):
    """A read-only WANDB_DATA_DIR or a network failure while staging the artifact: the stage and the next one
    finish, the warning is one line, and --resume uploads what was missing, once."""
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    real_add_dir = wandb.Artifact.add_dir

    def refused(self, *a, **k):
        raise PermissionError(13, "Permission denied", "/read-only/wandb-data")

    monkeypatch.setattr(wandb.Artifact, "add_dir", refused)
    assert cli.train_main(["--run-dir", str(run_dir), *ARGS]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "not uploaded" in line]
    assert len(warnings) == 2 and "--resume tries again" in warnings[0] and "Traceback" not in err
    assert _artifacts(run_dir) == []
    for stage in ("vanilla", "dverge"):
        state = checkpoint.read_state(checkpoint.latest(RunDir(run_dir).checkpoints(stage)))
        assert state["complete"] and not state.get("artifact_logged")
    monkeypatch.setattr(wandb.Artifact, "add_dir", real_add_dir)
    assert cli.train_main(["--run-dir", str(run_dir), "--resume"]) == 0
    assert sorted(stage for stage, _ in _artifacts(run_dir)) == ["dverge", "vanilla"]
    assert cli.train_main(["--run-dir", str(run_dir), "--resume"]) == 0  # uploaded once: nothing to do now
    assert sorted(stage for stage, _ in _artifacts(run_dir)) == ["dverge", "vanilla"]
