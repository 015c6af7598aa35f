"""Issue 19, kind 2: `--overwrite` replaces only a run directory dvtrain recognises as its own, and only what
dvtrain wrote there; anything else is refused with one line, exit status 2, and nothing deleted."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from dvtrain import cli

QUICK = [*TINY, "stages=[vanilla]", "vanilla.epochs=1", "data.train_limit=64", "eval.num_examples=16"]


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *QUICK]) == 0
    return run_dir


def _runs_parent(t: Path, trained: Path) -> Path:
    """The issue's example: `--run-dir runs` where runs/ holds several runs (and no run of its own)."""
    parent = t / "runs"
    for name in ("a", "b"):
        shutil.copytree(trained, parent / name)
    return parent


def _home(t: Path, trained: Path) -> Path:
    home = t / "home"
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("export X=1\n")
    (home / "Documents" / "thesis.tex").write_text("\\section{}\n")
    return home


def _foreign_config(t: Path, trained: Path) -> Path:
    folder = t / "service"
    folder.mkdir()
    (folder / "config.yaml").write_text("services:\n  web:\n    image: nginx\n")
    (folder / "data.db").write_bytes(b"\0" * 10)
    return folder


def _foreign_in_checkpoints(t: Path, trained: Path) -> Path:
    run = t / "copy"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "my_model.pt").write_bytes(b"weights")
    return run


def _checkpoints_link(t: Path, trained: Path) -> Path:
    run = t / "copy"
    shutil.copytree(trained, run)
    shutil.move(run / "checkpoints", t / "elsewhere")
    (run / "checkpoints").symlink_to(t / "elsewhere")
    return run


REFUSED = {
    "a folder of runs (the issue's example)": (_runs_parent, "is not a dvtrain run directory"),
    "a home folder": (_home, "is not a dvtrain run directory"),
    "a folder with someone else's config.yaml": (_foreign_config, "is not a dvtrain run directory"),
    "a file dvtrain did not write in checkpoints/": (_foreign_in_checkpoints, "checkpoints/ holds my_model.pt"),
    "checkpoints/ a link to another folder": (_checkpoints_link, "its checkpoints is not a folder dvtrain wrote"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_overwrite_refuses_what_is_not_a_dvtrain_run(case, trained, tmp_path, capsys):
    make, expected = REFUSED[case]
    folder = make(tmp_path, trained)
    before = digest(tmp_path)
    assert cli.train_main(["--run-dir", str(folder), "--overwrite", *QUICK]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected in err and "nothing was deleted" in err, err
    assert err.startswith("dvtrain: error: --overwrite refuses") and len(err.strip().splitlines()) == 1
    assert digest(tmp_path) == before


def test_overwrite_refuses_the_current_folder(trained, tmp_path, monkeypatch, capsys):
    home = _home(tmp_path, trained)
    monkeypatch.chdir(home)
    before = digest(home)
    assert cli.train_main(["--run-dir", ".", "--overwrite", *QUICK]) == cli.EXIT_USER_ERROR
    assert "is not a dvtrain run directory" in capsys.readouterr().err
    assert digest(home) == before


def test_overwrite_replaces_a_run_and_keeps_what_dvtrain_did_not_write(trained, tmp_path, capsys):
    """A careful user's expectation: the run starts over; notes they keep beside it stay (a note says so)."""
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "notes").mkdir()
    (run / "notes" / "ideas.md").write_text("try eps 0.05\n")
    (run / "README.txt").write_text("mine\n")
    outside = tmp_path / "shared-wandb"
    outside.mkdir()
    (outside / "keep.txt").write_text("not dvtrain's")
    shutil.rmtree(run / "wandb", ignore_errors=True)
    (run / "wandb").symlink_to(outside)  # a link dvtrain removes as a link, never following it
    old_weights = (run / "checkpoints" / "vanilla" / "sub0.safetensors").read_bytes()
    assert cli.train_main(["--run-dir", str(run), "--overwrite", *QUICK, "seed=7"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite kept what dvtrain did not write" in err and "README.txt, notes" in err
    assert (run / "notes" / "ideas.md").read_text() == "try eps 0.05\n" and (run / "README.txt").is_file()
    assert (outside / "keep.txt").read_text() == "not dvtrain's"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 7
    assert (run / "checkpoints" / "vanilla" / "sub0.safetensors").read_bytes() != old_weights


@pytest.mark.parametrize("content", ["empty", "config only (killed before its first checkpoint)"])
def test_overwrite_accepts_an_empty_folder_and_a_run_that_never_checkpointed(content, trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    if content != "empty":
        shutil.copy(trained / "config.yaml", run / "config.yaml")
    assert cli.train_main(["--run-dir", str(run), "--overwrite", *QUICK]) == 0
    assert (run / "checkpoints" / "vanilla" / "state.json").is_file()


def test_overwrite_through_a_symlinked_run_directory_keeps_the_link(trained, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(trained, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert cli.train_main(["--run-dir", str(link), "--overwrite", *QUICK, "seed=3"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert yaml.safe_load((real / "config.yaml").read_text())["seed"] == 3
