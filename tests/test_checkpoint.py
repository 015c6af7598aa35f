"""Checkpoints: exact round trip, atomic swap, clear errors for damaged files."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dvtrain import checkpoint
from dvtrain.config import load_config
from dvtrain.data import load_dataset
from dvtrain.train.optim import build_owned
from dvtrain.distributed.placement import LocalPlacement


def _owned(stage="dverge", *overrides):
    cfg = load_config(None, ["data.train_limit=32", *overrides])
    data = load_dataset(cfg.data)
    return build_owned(cfg, data, [0, 1, 2], stage, torch.device("cpu")), data


def _train_a_step(owned, data):
    for i in owned.ids:
        loss = F.cross_entropy(owned.models[i](data.x_train), data.y_train)
        owned.optimizers[i].zero_grad()
        loss.backward()
        owned.optimizers[i].step()
        torch.rand(5, generator=owned.generators[i])


def test_round_trip_is_exact(tmp_path):
    owned, data = _owned()
    _train_a_step(owned, data)
    path = tmp_path / "checkpoints" / "dverge"
    state = {"epoch": 1, "complete": False, "arch": "conv"}
    checkpoint.save_checkpoint(path, owned, LocalPlacement(3), state)
    assert sorted(p.name for p in path.iterdir()) == [
        "state.json", "sub0.resume.safetensors", "sub0.safetensors", "sub1.resume.safetensors",
        "sub1.safetensors", "sub2.resume.safetensors", "sub2.safetensors",
    ]
    fresh, _ = _owned()
    checkpoint.load_weights(path, fresh)
    checkpoint.load_resume_state(path, fresh)
    assert checkpoint.read_state(path) == state
    for i in owned.ids:
        a, b = owned.models[i].state_dict(), fresh.models[i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        sa, sb = owned.optimizers[i].state_dict(), fresh.optimizers[i].state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert all(torch.equal(sa["state"][p]["momentum_buffer"], sb["state"][p]["momentum_buffer"]) for p in sa["state"])
        assert torch.equal(owned.generators[i].get_state(), fresh.generators[i].get_state())
    # and training goes on identically
    _train_a_step(owned, data)
    _train_a_step(fresh, data)
    for i in owned.ids:
        assert all(torch.equal(p, q) for p, q in zip(owned.models[i].parameters(), fresh.models[i].parameters()))


def test_previous_checkpoint_survives_an_interrupted_swap(tmp_path):
    owned, data = _owned()
    path = tmp_path / "dverge"
    checkpoint.save_checkpoint(path, owned, LocalPlacement(3), {"epoch": 1})
    # a crash after `path` was renamed away but before the new one was renamed in
    path.rename(path.with_name("dverge.old"))
    (tmp_path / "dverge.tmp").mkdir()
    found = checkpoint.latest(path)
    assert found == path.with_name("dverge.old") and checkpoint.read_state(found) == {"epoch": 1}
    # the next save replaces both leftovers with one whole checkpoint
    checkpoint.save_checkpoint(path, owned, LocalPlacement(3), {"epoch": 2})
    assert checkpoint.latest(path) == path and checkpoint.read_state(path) == {"epoch": 2}
    assert not path.with_name("dverge.old").exists() and not path.with_name("dverge.tmp").exists()


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    owned, _ = _owned()
    path = tmp_path / "vanilla"
    checkpoint.save_checkpoint(path, owned, LocalPlacement(3), {"epoch": 1})
    file = path / "sub1.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load_weights(path, owned)
    other, _ = _owned("dverge", "model.arch=resnet20")
    checkpoint.save_checkpoint(tmp_path / "r", other, LocalPlacement(3), {"epoch": 1})
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the configured model"):
        checkpoint.load_weights(tmp_path / "r", owned)


def test_a_checkpoint_without_resume_streams_is_refused_clearly(tmp_path):
    """Checkpoints of dvtrain before step-level resume hold no data stream: say so, do not KeyError."""
    owned, _ = _owned()
    path = tmp_path / "dverge"
    checkpoint.save_checkpoint(path, owned, LocalPlacement(3), {"epoch": 1})
    file = path / "sub0.resume.safetensors"
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(file).items() if k != "data_generator"}
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(checkpoint.CheckpointError, match=r"lacks data_generator: an older dvtrain wrote it"):
        checkpoint.load_resume_state(path, owned)


def test_no_pickles_in_checkpoints(tmp_path):
    owned, _ = _owned()
    checkpoint.save_checkpoint(tmp_path / "s", owned, LocalPlacement(3), {"epoch": 0})
    for f in (tmp_path / "s").iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x02" and not head.startswith(b"PK")  # neither a pickle nor a torch.save zip
    json.loads((tmp_path / "s" / "state.json").read_text())
