"""Issue 19, kind 5: whatever the moment of any number of kills, `checkpoint.latest` finds the newest whole
checkpoint, and a resumed run ends bit-identical.

A kill is injected at every file-system step of a save (each safetensors file, the state.json rename, every
rename and deletion of the swap, and halfway through a deletion), then again at every step of the next
save, and checked against the generations whose state.json reached the disk."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dvtrain import checkpoint
from dvtrain.config import load_config
from dvtrain.data import load_dataset
from dvtrain.distributed.placement import LocalPlacement
from dvtrain.train.optim import build_owned


class Killed(BaseException):
    """Stands for kill -9: no `except Exception` or cleanup handler sees it."""


class Faults:
    """Counts the file-system steps of saves and kills at step `kill_at` (1-based; 0: never). With `half`, a
    folder deletion that is hit is left half done (one file removed), as a kill inside `rmtree` leaves it."""

    AFTER_WHOLE = -1  # kill_at: right after the new state.json is in, before any swap

    def __init__(self, monkeypatch) -> None:
        self.steps, self.kill_at, self.half, self.whole = 0, 0, False, []
        self.generation = 0
        real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, checkpoint.save_file

        def step(kind: str, target) -> None:
            self.steps += 1
            if self.steps == self.kill_at:
                if self.half and kind == "rmtree" and os.path.isdir(target):
                    files = sorted(p.path for p in os.scandir(target) if p.is_file())
                    if files:
                        os.remove(files[0])
                raise Killed(kind)

        def replace(src, dst, *a, **k):
            step("replace", src)
            real_replace(src, dst, *a, **k)
            if str(src).endswith(checkpoint.STATE_FILE + ".part"):
                self.whole.append(self.generation)  # this generation is on disk, whole
                if self.kill_at == self.AFTER_WHOLE:
                    raise Killed("after the state rename")

        def rmtree(target, *a, **k):
            step("rmtree", target)
            real_rmtree(target, *a, **k)

        def save_file(*a, **k):
            step("save_file", a[1])
            real_save(*a, **k)

        # A kill, unlike a power cut, loses nothing the kernel has: syncing to the disk is not what is tested.
        monkeypatch.setattr(checkpoint, "_fsync", lambda path: None)
        monkeypatch.setattr(checkpoint, "_fsync_dir", lambda path: None)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        monkeypatch.setattr(checkpoint, "save_file", save_file)

    def save(self, path, owned, generation: int, kill_at: int = 0, half: bool = False) -> bool:
        """Save generation `generation` (its number is in the state and added to every weight); False when
        the kill landed."""
        self.steps, self.kill_at, self.half, self.generation, self.killed_in = 0, kill_at, half, generation, None
        with torch.no_grad():
            for i in owned.ids:
                next(owned.models[i].parameters()).fill_(float(generation))
        try:
            checkpoint.save_checkpoint(path, owned, LocalPlacement(len(owned.ids)), {"generation": generation})
        except Killed as kill:
            self.killed_in = kill.args[0]
            return False
        return True


@pytest.fixture(scope="module")
def owned():
    cfg = load_config(None, ["data.train_limit=16", "ensemble.size=2"])
    return build_owned(cfg, load_dataset(cfg.data), [0, 1], "vanilla", torch.device("cpu"))


def check_newest(path, owned, faults: Faults) -> None:
    """`latest` returns the newest generation whose state.json was written, with all its files whole."""
    found = checkpoint.latest(path)
    assert found is not None, sorted(p.name for p in path.parent.iterdir())
    newest = max(faults.whole)
    assert checkpoint.read_state(found) == {"generation": newest}, (found, sorted(p.name for p in path.parent.iterdir()))
    checkpoint.load_weights(found, owned)  # every submodel's file read in full (a torn one is refused)
    assert all(float(next(owned.models[i].parameters()).detach().flatten()[0]) == newest for i in owned.ids)


def steps_of_a_save(tmp_path, owned, monkeypatch) -> int:
    faults = Faults(monkeypatch)
    path = tmp_path / "count" / "vanilla"
    faults.save(path, owned, 1)
    faults.save(path, owned, 2)  # the second save also swaps out a previous checkpoint
    return faults.steps


def test_two_kills_in_a_row_at_every_step_of_the_swap_keep_the_newest_whole_checkpoint(owned, tmp_path, monkeypatch):
    """A kill that hits a deletion leaves it half done (one file removed): the worst moment inside `rmtree`."""
    steps = steps_of_a_save(tmp_path, owned, monkeypatch)
    assert steps >= 8  # (2 submodels × 2 files, the state rename, the swap's renames and deletions)
    faults = Faults(monkeypatch)
    for first in range(1, steps + 2):  # (steps + 1: not killed)
        for second in range(1, steps + 3):
            path = tmp_path / f"{first}-{second}" / "vanilla"
            faults.whole = []
            assert faults.save(path, owned, 1)
            killed = not faults.save(path, owned, 2, kill_at=first, half=True)
            check_newest(path, owned, faults)
            faults.save(path, owned, 3, kill_at=second, half=True)  # resumed, killed again
            check_newest(path, owned, faults)
            assert faults.save(path, owned, 4)  # and finally a save that goes through leaves one folder
            assert checkpoint.read_state(checkpoint.latest(path)) == {"generation": 4}
            assert sorted(p.name for p in path.parent.iterdir()) == ["vanilla"], (first, second)
            assert killed == (first <= steps)
            shutil.rmtree(path.parent)


def test_a_whole_tmp_left_by_a_kill_is_found_and_swapped_in_not_deleted(owned, tmp_path, monkeypatch):
    """The issue's sequence: a kill between the swap's two renames leaves `.old` and a whole `.tmp`; the next
    save must not delete them before the new checkpoint is in place."""
    faults = Faults(monkeypatch)
    path = tmp_path / "vanilla"
    assert faults.save(path, owned, 1)
    os.replace(path, path.with_name("vanilla.old"))  # the state a kill between the renames leaves
    assert faults.save(path, owned, 2, kill_at=Faults.AFTER_WHOLE) is False
    assert checkpoint.latest(path) == path.with_name("vanilla.tmp")
    check_newest(path, owned, faults)
    for kill_at in range(1, 4):  # the following save killed at each of its first steps: 2 stays found
        assert faults.save(path, owned, 3, kill_at=kill_at) is False
        check_newest(path, owned, faults)


def test_training_killed_twice_inside_swaps_resumes_bit_identical(tmp_path, monkeypatch):
    """The real training loop, killed right after a new checkpoint's state.json is in (before its swap), then
    killed again in the resumed run's first swap, then resumed: the final weights equal an uninterrupted run's."""
    from safetensors.torch import load_file

    from conftest import TINY
    from dvtrain import cli

    args = [*TINY, "stages=[vanilla, dverge]", "vanilla.epochs=2", "checkpoint.every_steps=2", "data.train_limit=192",
            "eval.num_examples=16"]
    straight = tmp_path / "straight"
    assert cli.train_main(["--run-dir", str(straight), *args]) == 0
    run = tmp_path / "run"
    real_replace = os.replace
    renames = {"n": 0, "kill": 0}

    def replace(src, dst, *a, **k):
        renames["n"] += 1
        real_replace(src, dst, *a, **k)
        if renames["n"] == renames["kill"]:
            raise Killed("os.replace")

    monkeypatch.setattr(os, "replace", replace)
    for kill in (7, 1):  # 7: a state.json rename inside the vanilla stage; 1: the resumed run's first swap step
        renames.update(n=0, kill=kill)
        with pytest.raises(Killed):
            cli.train_main(["--run-dir", str(run), *args] if kill == 7 else ["--run-dir", str(run), "--resume"])
        assert checkpoint.latest(run / "checkpoints" / "vanilla") is not None
    renames.update(n=0, kill=0)
    assert cli.train_main(["--run-dir", str(run), "--resume"]) == 0
    for stage in ("vanilla", "dverge"):
        for i in range(3):
            a = load_file(straight / "checkpoints" / stage / f"sub{i}.safetensors")
            b = load_file(run / "checkpoints" / stage / f"sub{i}.safetensors")
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), (stage, i)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["dverge", "vanilla"]
