"""Issue 26: every result carries its basis. `dvtrain eval` verifies a run's data against what its
training recorded (finding 2), before any work."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import TINY
from dvtrain import cli
from dvtrain.config import load_config
from dvtrain.data import load_dataset
from dvtrain.digest import images_digest
from dvtrain.errors import DvtrainError
from dvtrain.eval.evaluate import verify_run_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of one vanilla epoch on digits: its results.json rows carry their images' digest."""
    run_dir = tmp_path_factory.mktemp("basis") / "run"
    assert cli.train_main(["--run-dir", str(run_dir), *TINY, "stages=[vanilla]", "vanilla.epochs=1",
                           "eval.num_examples=60"]) == 0
    return run_dir


def test_training_rows_record_the_digest_of_their_images(trained):
    cfg = load_config(trained / "config.yaml")
    data = load_dataset(cfg.data)
    rows = json.loads((trained / "results.json").read_text())["eval"]
    assert rows and {r["images"] for r in rows} == {images_digest(data.x_test[:60], data.y_test[:60])}
    assert {r["test_split"] for r in rows} == {images_digest(data.x_test, data.y_test)}
    assert verify_run_data(trained, data)["test"] == images_digest(data.x_test, data.y_test)


@pytest.mark.parametrize("edit", ["data.test_fraction=0.3", "data.split_seed=5"])
def test_a_hand_edited_data_section_is_refused_with_one_line_before_any_work(trained, tmp_path, capsys, edit):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    key, value = edit.split("=")
    text = (run_dir / "config.yaml").read_text()
    field = key.split(".")[1]
    lines = text.splitlines()
    start = lines.index("data:")
    for k in range(start + 1, len(lines)):
        if lines[k].strip().startswith(field + ":"):
            lines[k] = f"  {field}: {value}"
            break
    (run_dir / "config.yaml").write_text("\n".join(lines) + "\n")
    before = (run_dir / "results.json").read_bytes()
    assert cli.main(["eval", str(run_dir)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dvtrain: ")]
    assert len(err) == 1 and "test images differ" in err[0] and "config.yaml" in err[0], err
    assert (run_dir / "results.json").read_bytes() == before  # nothing overwritten
    assert not (tmp_path / "transfer_cache").exists()  # refused before any surrogate was trained


def test_a_recorded_split_digest_is_checked_part_by_part(trained, tmp_path):
    cfg = load_config(trained / "config.yaml")
    data = load_dataset(cfg.data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    split = verify_run_data(trained, data)
    (run_dir / "results.json").write_text(json.dumps({"eval": [], "stages": {}, "data": split}))
    assert verify_run_data(run_dir, data) == split
    x_train = data.x_train.clone()
    x_train[0] = 1 - x_train[0]
    with pytest.raises(DvtrainError, match="the train images differ"):
        verify_run_data(run_dir, dataclasses.replace(data, x_train=x_train))


def test_an_old_run_without_a_digest_is_said_once_and_evaluated(tmp_path, capsys, trained):
    cfg = load_config(trained / "config.yaml")
    data = load_dataset(cfg.data)
    rows = json.loads((trained / "results.json").read_text())["eval"]
    (tmp_path / "results.json").write_text(json.dumps({"eval": [{k: v for k, v in r.items() if k not in ("images", "test_split")}
                                                                for r in rows], "stages": {}}))
    verify_run_data(tmp_path, data)
    out = capsys.readouterr().out
    assert out.count("records no digest of its data") == 1


@pytest.mark.parametrize("layer", ["99", "0"])
def test_a_diversity_layer_the_model_lacks_is_refused_before_any_work(trained, tmp_path, capsys, layer):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = (run_dir / "results.json").read_bytes()
    capsys.readouterr()
    code = cli.main(["eval", str(run_dir), f"eval.diversity.layer={layer}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dvtrain: ")]
    if layer == "0":  # outside the field's own range: the config says so
        assert code == 2 and len(err) == 1 and "eval.diversity.layer" in err[0]
        return
    assert code == 2 and len(err) == 1 and "eval.diversity.layer=99 is out of range: conv has layers 1.." in err[0], err
    assert (run_dir / "results.json").read_bytes() == before and not (tmp_path / "transfer_cache").exists()
