"""Issue 28, kinds 8 and 9: the operating system's limits on names and paths, and settings that empty a set.

Kind 8: a name longer than the file system's NAME_MAX (counted in bytes, as the kernel does: "é" is two) or a
path longer than PATH_MAX, given or derived (the run directory with everything dvtrain and W&B write below it,
the transfer cache, W&B's folders, compare's --csv and the files --plot draws), is refused with one line and
exit 2 before any work, instead of an `OSError: [Errno 36] File name too long` traceback after it.

Kind 9: a setting that leaves the training or test split empty, or smaller than what a stage needs (a full
batch with data.drop_last, two images for the diversity matrix), is refused before any stage trains, with the
numbers; a setting that asks for more test images than there are is noted (each table gives its n).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from conftest import TINY
from dvtrain import cli, storage
from dvtrain.config import load_config
from dvtrain.eval import evaluate
from dvtrain.paths import DEEPEST_BELOW, PathError, check_length, limits
from dvtrain.splits import SplitError, check_evaluation, check_full_batches

NAME_MAX, PATH_MAX = limits("/tmp")


def one_line(err: str) -> str:
    assert err.startswith("dvtrain: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _refused(args: list[str], capsys, command: str = "train") -> str:
    capsys.readouterr()
    assert cli.main([command, *args]) == cli.EXIT_USER_ERROR
    return one_line(capsys.readouterr().err)


def _deep(tmp_path: Path, total: int) -> Path:
    """A path of about `total` bytes below tmp_path, in names of 200 bytes."""
    parts, size = [], len(str(tmp_path))
    while size < total:
        parts.append("d" * 200)
        size += 201
    return tmp_path.joinpath(*parts)


# ----------------------------------------------------------------------------- kind 8: train


RUN_DIRS = {
    "last name one byte over NAME_MAX": (lambda t: t / ("r" * (NAME_MAX + 1)), f"is {NAME_MAX + 1} bytes, more than the {NAME_MAX}"),
    "non-ASCII name under NAME_MAX in characters, over it in bytes": (
        lambda t: t / ("é" * (NAME_MAX // 2 + 1)), f"is {2 * (NAME_MAX // 2 + 1)} bytes, more than the {NAME_MAX}"),
    "a folder above it over NAME_MAX": (lambda t: t / ("p" * (NAME_MAX + 5)) / "run", "more than the"),
    "path over PATH_MAX": (lambda t: _deep(t, PATH_MAX + 10), f"more than the {PATH_MAX - 1} a path may have"),
    "path under PATH_MAX, but not with what dvtrain writes below it": (
        lambda t: _deep(t, PATH_MAX - DEEPEST_BELOW), f"with the up to {DEEPEST_BELOW} bytes dvtrain writes below it"),
}


@pytest.mark.parametrize("case", sorted(RUN_DIRS))
def test_train_refuses_a_run_directory_beyond_the_file_system_limits(case, tmp_path, capsys):
    make, expected = RUN_DIRS[case]
    err = _refused(["--run-dir", str(make(tmp_path)), *TINY], capsys)
    assert expected in err and "choose a shorter one" in err and len(err) < 600, err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_run_name_over_name_max_is_refused_when_it_names_the_run_directory(tmp_path, capsys):
    err = _refused([*TINY, f"runs_dir={tmp_path}", "name=" + "n" * (NAME_MAX + 1)], capsys)
    assert "run directory" in err and f"is {NAME_MAX + 1} bytes" in err
    assert list(tmp_path.iterdir()) == []


def test_a_config_file_name_over_name_max_is_refused(tmp_path, capsys):
    err = _refused(["--config", str(tmp_path / ("c" * (NAME_MAX + 1) + ".yaml"))], capsys)
    assert "config file" in err and "more than the" in err


def test_a_data_root_over_the_limits_is_refused(tmp_path, capsys):
    err = _refused(["--run-dir", str(tmp_path / "run"), *TINY, "data.name=cifar10",
                    f"data.root={tmp_path / ('x' * (NAME_MAX + 1))}"], capsys)
    assert err.startswith("dvtrain: error: data.root") and "more than the" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable", ["WANDB_DATA_DIR", "WANDB_CACHE_DIR"])
def test_a_wandb_folder_over_the_limits_is_refused(variable, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv(variable, str(_deep(tmp_path, PATH_MAX)))
    args = [o for o in TINY if not o.startswith("logging.wandb")] + ["logging.wandb=offline", "logging.artifacts=true"]
    err = _refused(["--run-dir", str(tmp_path / "run"), *args], capsys)
    assert f"W&B folder ({variable})" in err and "more than the" in err
    assert not (tmp_path / "run").exists()


def test_names_at_the_limit_are_accepted_and_written(tmp_path):
    """Exactly NAME_MAX bytes is fine, and a whole-file write there needs no longer temporary name."""
    folder = tmp_path / ("f" * NAME_MAX)
    check_length(folder, "run directory", "")
    folder.mkdir()
    storage.write_atomic(folder / ("g" * NAME_MAX), "x")
    assert [p.name for p in folder.iterdir()] == ["g" * NAME_MAX]
    with pytest.raises(PathError, match="more than the"):
        check_length(folder / "x", "run directory", "", name_room=NAME_MAX)


# ----------------------------------------------------------------------------- kind 8: eval and compare


def _no_work(monkeypatch) -> None:
    monkeypatch.setattr(evaluate, "full_evaluation",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the evaluation started")))


def test_eval_refuses_a_transfer_cache_over_the_limits_before_any_work(vanilla_run, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(vanilla_run, run_dir)
    _no_work(monkeypatch)
    err = _refused([str(run_dir), f"eval.transfer.cache_dir={tmp_path / ('c' * (NAME_MAX + 1))}"], capsys, "eval")
    assert "transfer cache" in err and "more than the" in err


def test_eval_refuses_a_run_directory_name_over_name_max(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    err = _refused([str(tmp_path / ("r" * (NAME_MAX + 1)))], capsys, "eval")
    assert "run directory" in err and "more than the" in err


COMPARE = {
    "--csv name over NAME_MAX": (lambda t, r: [str(r), "--csv", str(t / ("t" * NAME_MAX + ".csv"))], "more than the"),
    "--csv path over PATH_MAX": (lambda t, r: [str(r), "--csv", str(_deep(t, PATH_MAX) / "t.csv")], "a path may have"),
    "--plot name leaving no room for the charts' suffixes": (
        lambda t, r: [str(r), "--plot", str(t / ("p" * (NAME_MAX - 10) + ".png"))],
        f"bytes with the {cli.PLOT_NAME_ROOM} bytes dvtrain adds to it"),
    "a run named over NAME_MAX": (lambda t, r: [str(t / ("r" * (NAME_MAX + 1)))], "more than the"),
}


@pytest.mark.parametrize("case", sorted(COMPARE))
def test_compare_refuses_paths_over_the_limits_before_reading_runs(case, vanilla_run, tmp_path, capsys, monkeypatch):
    from dvtrain.report import compare

    monkeypatch.setattr(compare, "read_source", lambda *a, **k: (_ for _ in ()).throw(AssertionError("runs were read")))
    make, expected = COMPARE[case]
    err = _refused(make(tmp_path, vanilla_run), capsys, "compare")
    assert expected in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- kind 9: empty splits


@pytest.mark.parametrize("override, expected", [
    ("data.test_fraction=0.0001", "data.test_fraction=0.0001 leaves no digits image for the test split (0 of 1797"),
    ("data.test_fraction=0.0002", "set data.test_fraction above 0.000278"),
    ("data.test_fraction=0.9999", "leaves no digits image for the training split (1797 of 1797 go to the test split)"),
])
def test_a_test_fraction_that_empties_a_split_is_refused_before_any_stage(override, expected, tmp_path, capsys):
    err = _refused(["--run-dir", str(tmp_path / "run"), *TINY, override], capsys)
    assert expected in err, err
    assert not (tmp_path / "run").exists()


def test_the_smallest_fractions_that_keep_an_image_in_each_split_are_accepted():
    from dvtrain.data import load_dataset

    low = load_dataset(load_config(None, ["data.test_fraction=0.000279"]).data)
    high = load_dataset(load_config(None, ["data.test_fraction=0.99972"]).data)
    assert (len(low.y_test), len(high.y_train)) == (1, 1)


@pytest.mark.parametrize("split", ["test", "training"])
def test_a_dataset_with_an_empty_split_is_refused(split, tmp_path, capsys, monkeypatch):
    """torchvision's readers refuse empty CIFAR-10 and Fashion-MNIST files themselves; any loader that still
    returns an empty split is refused by dvtrain.data before any stage (a dataset added later included)."""
    from dvtrain import data

    real = data._digits

    def emptied(cfg):
        ds = real(cfg)
        return dataclasses.replace(ds, **({"x_test": ds.x_test[:0], "y_test": ds.y_test[:0]} if split == "test"
                                          else {"x_train": ds.x_train[:0], "y_train": ds.y_train[:0]}))

    monkeypatch.setattr(data, "_digits", emptied)
    err = _refused(["--run-dir", str(tmp_path / "run"), *TINY], capsys)
    assert f"the {split} split of digits is empty (0 images" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["vanilla", "dverge", "dverge_advt"])
def test_a_full_batch_larger_than_the_training_split_is_refused(stage, tmp_path, capsys):
    """data.drop_last=true with a batch above the 256 training images: the stage would take no step."""
    err = _refused(["--run-dir", str(tmp_path / "run"), *TINY, "data.drop_last=true", f"{stage}.batch_size=257"], capsys)
    assert f"{stage}.batch_size=257 with data.drop_last=true leaves no full batch in the 256 training images" in err
    assert not (tmp_path / "run").exists()


def test_full_batches_only_matter_for_stages_that_train_and_with_drop_last():
    cfg = load_config(None, ["data.drop_last=true", "vanilla.batch_size=300", "vanilla.epochs=0"])
    check_full_batches(cfg, 256, ["vanilla"])  # no epoch: no step expected
    check_full_batches(load_config(None, ["vanilla.batch_size=300"]), 256, ["vanilla"])  # a partial batch is a step
    check_full_batches(load_config(None, ["data.drop_last=true", "vanilla.batch_size=256"]), 256, ["vanilla"])
    with pytest.raises(SplitError, match="vanilla.batch_size=300"):
        check_full_batches(load_config(None, ["data.drop_last=true", "vanilla.batch_size=300"]), 256, ["vanilla"])


def test_evaluation_needs_two_test_images_for_the_diversity_matrix_and_full_surrogate_batches():
    cfg = load_config(None, [])
    with pytest.raises(SplitError, match="eval.diversity needs pairs of 2 different test images, but the test split has 1"):
        check_evaluation(cfg, cfg.eval.transfer, 256, 1)
    off = load_config(None, ["eval.diversity.enabled=false"])
    check_evaluation(off, off.eval.transfer, 256, 1)
    surrogates = load_config(None, ["data.drop_last=true", "vanilla.batch_size=300"])
    with pytest.raises(SplitError, match="vanilla.batch_size=300 with data.drop_last=true"):
        check_evaluation(surrogates, surrogates.eval.transfer, 256, 359)


def test_asking_for_more_test_images_than_there_are_is_noted_with_the_numbers():
    cfg = load_config(None, ["eval.transfer.num_images=1000", "eval.num_examples=64", "eval.diversity.num_images=20"])
    notes = check_evaluation(cfg, cfg.eval.transfer, 256, 30)
    assert notes == [
        "dvtrain: note: eval.transfer.num_images=1000 is more than the 30 test images: its tables use all 30 (each row gives its n)",
        "dvtrain: note: eval.num_examples=64 is more than the 30 test images: its tables use all 30 (each row gives its n)"]
    assert check_evaluation(cfg, cfg.eval.transfer, 256, 1000) == []
