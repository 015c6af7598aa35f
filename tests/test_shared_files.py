"""Issue 28, kinds 3 and 4: files that others must read, and paths that are not regular files.

Kind 3: every file dvtrain writes follows the umask (safetensors 0.8 creates its files 0600 whatever the
umask, its issue 782), so a group sharing a run directory or the transfer cache can read them; a file this
user may not read is named unreadable (permission denied), never "corrupt or truncated", and no advice
removes another user's files. The tests run as root, which permission bits do not stop: the reader runs in
a subprocess with root's DAC capabilities dropped (`setpriv --bounding-set`), on files owned by another
user (nobody), so the denial is the kernel's own.

Kind 4: every whole-file write goes through `dvtrain.storage.replacing`: a symbolic link is followed (the
link stays, its target is rewritten), anything that is not a regular file or a new path (folder, FIFO,
character device, link loop) is refused with one line, and no temporary file is left behind, also when the
write fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from dvtrain import cli, storage
from dvtrain.eval import example_sets, report
from dvtrain.config import load_config

NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def one_line(err: str) -> str:
    assert err.startswith("dvtrain: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(storage.TEMP_PREFIX)]


@pytest.fixture
def umask():
    """Set this process's umask for one test (restored afterwards)."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


# ----------------------------------------------------------------------------- kind 3: permissions


def test_a_whole_run_follows_the_umask_checkpoints_included(tmp_path):
    """A real `dvtrain train` under umask 007 (a group sharing the run): every file, the safetensors
    checkpoints included, is 0660 and every folder 0770, not safetensors' 0600."""
    run_dir = tmp_path / "run"
    args = [*TINY, "stages=[vanilla]", "vanilla.epochs=1", "data.train_limit=64", "eval.num_examples=16",
            "eval.attacks=[clean,fgsm]"]
    code = f"import os, sys; os.umask(0o007); from dvtrain.cli import main; sys.exit(main({['train', '--run-dir', str(run_dir), *args]!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    files = modes(run_dir)
    assert any(name.endswith(".safetensors") for name in files) and any(name.endswith(".png") for name in files)
    assert {name: mode for name, mode in files.items() if mode != 0o660 and not name.endswith(".lock")} == {}
    folders = {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*") if p.is_dir()}
    assert set(folders.values()) == {0o770}, folders


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_a_cached_example_set_and_its_manifest_follow_the_umask(mask, tmp_path, umask):
    umask(mask)
    manifest = {"attack": "mi_pgd", "loss": "ce", "eps": 0.1}
    example_sets.load_or_generate(tmp_path, manifest, lambda: torch.zeros(1, 2, 1, 8, 8))
    found = {p.suffix: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.suffix != ".lock"}
    assert found == {".safetensors": 0o666 & ~mask, ".json": 0o666 & ~mask}
    assert not temporaries(tmp_path)


def test_a_replaced_file_keeps_the_permissions_it_had(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "results.json"
    target.write_text("{}")
    target.chmod(0o664)  # made readable for the group by its owner
    storage.write_atomic(target, '{"eval": []}')
    assert stat.S_IMODE(target.stat().st_mode) == 0o664 and target.read_text() == '{"eval": []}'


def _unprivileged(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m dvtrain ARGS` as root without the capabilities that bypass file permissions."""
    if SETPRIV is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to take the permission bypass away")
    return subprocess.run([SETPRIV, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "dvtrain",
                           *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _give_away(path: Path, mode: int) -> None:
    os.chown(path, NOBODY, -1)
    path.chmod(mode)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


UNREADABLE = {
    "another user's checkpoint weights (eval)": ("checkpoints/vanilla/sub1.safetensors", ["eval"]),
    "another user's checkpoint weights (train --resume)": ("checkpoints/vanilla/sub1.safetensors",
                                                            ["train", "--resume", "stages=[vanilla,dverge]"]),
    "another user's checkpoint state (train --resume)": ("checkpoints/vanilla/state.json",
                                                          ["train", "--resume", "stages=[vanilla,dverge]"]),
    "another user's results.json (eval)": ("results.json", ["eval"]),
    "another user's config.yaml (eval)": ("config.yaml", ["eval"]),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_a_file_another_user_keeps_to_himself_is_named_unreadable_and_never_removed(case, vanilla_run, tmp_path):
    rel, command = UNREADABLE[case]
    run_dir = tmp_path / "run"
    shutil.copytree(vanilla_run, run_dir)
    _give_away(run_dir / rel, 0o600)  # as safetensors 0.8 leaves it, owned by another user
    before = _digest(run_dir)
    done = _unprivileged(command[0], *(["--run-dir", str(run_dir)] if command[0] == "train" else [str(run_dir)]),
                         *command[1:])
    assert done.returncode == cli.EXIT_USER_ERROR, done.stderr
    err = one_line(done.stderr)
    assert "cannot be read: permission denied (owner nobody, mode -rw-------)" in err and rel in err, err
    assert "corrupt" not in err and "truncated" not in err and "remove" not in err, err
    assert _digest(run_dir) == before


def test_a_damaged_checkpoint_of_another_user_is_not_advised_away(vanilla_run, tmp_path):
    """Readable but truncated, and another user's: named damaged, with no advice to remove it."""
    run_dir = tmp_path / "run"
    shutil.copytree(vanilla_run, run_dir)
    folder = run_dir / "checkpoints" / "vanilla"
    weights = folder / "sub1.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for path in (folder, *folder.iterdir()):
        os.chown(path, NOBODY, -1)
    done = _unprivileged("eval", str(run_dir))
    err = one_line(done.stderr)
    assert "corrupt or truncated" in err and "it belongs to nobody" in err and "remove " + str(folder) not in err, err


def test_an_unreadable_file_raised_inside_dvtrain_is_named_unreadable(tmp_path, monkeypatch):
    """Where the kernel's refusal reaches Python (any reader of paths.read_text): permission, not damage."""
    from dvtrain.paths import PathError, read_json_object

    target = tmp_path / "state.json"
    target.write_text("{}")
    monkeypatch.setattr(Path, "read_text", lambda self, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PathError) as caught:
        read_json_object(target, "checkpoint state", f"remove {tmp_path} to start that stage over")
    assert "cannot be read: permission denied" in str(caught.value) and "remove" not in str(caught.value)


# ----------------------------------------------------------------------------- kind 4: what is not a regular file


def _compare(trained: Path, *args: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["compare", str(trained), *args])
    return code, capsys.readouterr().err


READ_ONLY_PROBE = """
import sys, torch
from dvtrain.errors import DvtrainError
from dvtrain.eval import example_sets
cache, have = sys.argv[1], float(sys.argv[2])
print(float(example_sets.load_or_generate(cache, {"attack": "mi_pgd", "loss": "ce", "eps": 0.1}, None).sum()) == have)
try:
    example_sets.load_or_generate(cache, {"attack": "mi_pgd", "loss": "ce", "eps": 0.2}, lambda: torch.zeros(1, 2, 1, 8, 8))
except DvtrainError as exc:
    print(exc)
"""


@pytest.mark.parametrize("lock", ["the set's lock is there", "no lock yet"])
def test_a_cache_another_user_shares_read_only_is_read_and_crafting_in_it_is_one_line(lock, tmp_path, umask):
    """A transfer cache another user wrote under umask 022 (files 0644, folder 0755): a stored example set
    is read, verified, without taking its lock (which this user may not open for writing); crafting a
    missing set is refused with one line (the lock, its owner or folder, the fix), and nothing in the cache
    changes."""
    if SETPRIV is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to take the permission bypass away")
    umask(0o022)
    cache = tmp_path / "cache"
    stored = torch.arange(128, dtype=torch.float32).reshape(1, 2, 1, 8, 8)
    example_sets.load_or_generate(cache, {"attack": "mi_pgd", "loss": "ce", "eps": 0.1}, lambda: stored)
    missing = example_sets.set_path(cache, {"format": example_sets.FORMAT, "attack": "mi_pgd", "loss": "ce", "eps": 0.2})
    if lock == "the set's lock is there":
        missing.with_suffix(".lock").touch()
    for path in [cache, *cache.iterdir()]:
        os.chown(path, NOBODY, -1)
    before = _digest(cache), sorted(p.name for p in cache.iterdir())
    done = subprocess.run([SETPRIV, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                           READ_ONLY_PROBE, str(cache), str(float(stored.sum()))], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    read, refusal = done.stdout.splitlines()
    assert read == "True"
    assert refusal.startswith(f"cannot take the lock {missing.with_suffix('.lock')} for crafting {missing.name}: "
                              "permission denied"), refusal
    assert ("(owner nobody, mode -rw-r--r--)" if lock == "the set's lock is there" else "is not writable for you") in refusal
    assert "eval.transfer.cache_dir" in refusal and "nothing was changed" in refusal
    assert (_digest(cache), sorted(p.name for p in cache.iterdir())) == before


def test_compare_csv_through_a_symlink_rewrites_its_target_and_keeps_the_link(vanilla_run, tmp_path, capsys):
    target = tmp_path / "tables" / "old.csv"
    target.parent.mkdir()
    target.write_text("the old table\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    code, err = _compare(vanilla_run, "--csv", str(link), capsys=capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("run,") and not temporaries(tmp_path)


def test_compare_csv_through_a_dangling_symlink_creates_its_target(vanilla_run, tmp_path, capsys):
    link = tmp_path / "latest.csv"
    link.symlink_to(tmp_path / "new.csv")
    code, err = _compare(vanilla_run, "--csv", str(link), capsys=capsys)
    assert code == 0, err
    assert link.is_symlink() and (tmp_path / "new.csv").read_text().startswith("run,")


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    return path


def _loop(tmp_path: Path) -> Path:
    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    return tmp_path / "a.csv"


def _link_to_folder(tmp_path: Path) -> Path:
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.csv").symlink_to(tmp_path / "folder")
    return tmp_path / "link.csv"


NOT_A_FILE = {
    "a FIFO": (_fifo, "is a named pipe (FIFO), not a regular file", stat.S_ISFIFO),
    "a character device (/dev/full)": (lambda t: Path("/dev/full"), "is a character device", stat.S_ISCHR),
    "a folder": (lambda t: storage.Path(t / "out").mkdir() or t / "out", "is a folder", stat.S_ISDIR),
    "a symlink to a folder": (_link_to_folder, "(a link to ", stat.S_ISDIR),
    "a symlink loop": (_loop, "cannot be written", None),
}


@pytest.mark.parametrize("case", sorted(NOT_A_FILE))
def test_compare_csv_refuses_what_is_not_a_regular_file_before_reading_runs(case, vanilla_run, tmp_path, capsys,
                                                                          monkeypatch):
    from dvtrain.report import compare

    make, expected, kind = NOT_A_FILE[case]
    path = make(tmp_path)
    monkeypatch.setattr(compare, "read_source", lambda *a, **k: (_ for _ in ()).throw(AssertionError("runs were read")))
    code, err = _compare(vanilla_run, "--csv", str(path), capsys=capsys)
    assert code == cli.EXIT_USER_ERROR
    assert expected in one_line(err) and "--csv" in err, err
    if kind is not None:
        assert kind(os.stat(path).st_mode)  # still what it was
    assert not temporaries(tmp_path) and not Path(str(path) + ".tmp").exists()


@pytest.mark.parametrize("case", sorted(NOT_A_FILE))
def test_the_write_helper_itself_refuses_it(case, tmp_path):
    make, expected, _ = NOT_A_FILE[case]
    with pytest.raises(storage.StorageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        storage.write_atomic(make(tmp_path), "x")


def test_a_symlinked_results_json_is_updated_through_its_link(vanilla_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(vanilla_run, run_dir)
    kept = tmp_path / "elsewhere" / "results.json"
    kept.parent.mkdir()
    shutil.move(run_dir / "results.json", kept)
    (run_dir / "results.json").symlink_to(kept)
    cfg = load_config(run_dir / "config.yaml")
    report.update_results(run_dir, cfg, lambda results: results.setdefault("note", "added"))
    assert (run_dir / "results.json").is_symlink()
    assert json.loads(kept.read_text())["note"] == "added" and not temporaries(tmp_path)


def test_a_write_that_fails_midway_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(OSError):
        with storage.replacing(target) as tmp:
            tmp.write_text("half a ta")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_target_whose_name_fills_the_file_system_limit_still_gets_a_temporary_name(tmp_path):
    """The temporary name is short and fixed: `<a 255-byte name>.tmp` would exceed NAME_MAX."""
    target = tmp_path / ("x" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".csv")
    storage.write_atomic(target, "a,b\n")
    assert target.read_text() == "a,b\n" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_overwrite_removes_a_temporary_file_a_kill_left(tmp_path):
    assert storage.owned_entry(f"{storage.TEMP_PREFIX}0123456789ab{storage.TEMP_SUFFIX}")


CHECK_EVAL_WRITABLE = """
import sys
from pathlib import Path
from dvtrain import cli
from dvtrain.config import load_config
from dvtrain.errors import DvtrainError
cfg = load_config(None, ["logging.wandb=disabled", f"eval.transfer.cache_dir={sys.argv[2]}"])
try:
    cli.check_eval_writable(cfg, Path(sys.argv[1]))
    print("checked")
except DvtrainError as exc:
    print(exc)
"""


@pytest.mark.parametrize("cache_there", [True, False])
def test_dvtrain_eval_reads_a_read_only_shared_cache_and_refuses_one_it_cannot_create(cache_there, tmp_path, umask):
    """`dvtrain eval`'s check before work (new-user finding: a read-only cache holding every set was refused).
    A cache another user shares read-only is accepted with a one-line note (what is stored is read; a missing
    item stops the evaluation when needed); a cache that does not exist and cannot be created is refused."""
    if SETPRIV is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to take the permission bypass away")
    umask(0o022)
    run_dir, shared = tmp_path / "run", tmp_path / "shared"
    run_dir.mkdir()
    shared.mkdir()
    cache = shared / "cache"
    if cache_there:
        cache.mkdir()
        os.chown(cache, NOBODY, -1)
    os.chown(shared, NOBODY, -1)
    done = subprocess.run([SETPRIV, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                           CHECK_EVAL_WRITABLE, str(run_dir), str(cache)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    if cache_there:
        assert done.stdout.strip() == "checked"
        assert done.stderr.startswith(f"dvtrain: note: the transfer cache {cache} is read-only for you: ")
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    else:
        assert done.stdout.startswith(f"transfer cache {cache} cannot be written (Permission denied)"), done.stdout
        assert "set eval.transfer.cache_dir to a folder of your own" in done.stdout and done.stderr == ""
