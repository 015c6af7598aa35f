"""Datasets load as tensors in [0, 1]; batches and augmentation are reproducible."""

import gzip
import os
from pathlib import Path

import pytest
import torch

from conftest import write_cifar10
from dvtrain.config import DataConfig
from dvtrain.data import (
    FASHION_MNIST_SYSTEM_DIR, DataError, augment, augmentation_draws, batches, load_dataset, num_batches, paired_batches,
)


def test_digits_split_is_fixed_and_disjoint():
    a = load_dataset(DataConfig(name="digits"))
    b = load_dataset(DataConfig(name="digits"))
    assert a.x_train.shape == (1438, 1, 8, 8) and a.x_test.shape == (359, 1, 8, 8)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) == 1.0
    train_rows = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in a.x_test.flatten(1).tolist())
    assert overlap < 10  # a handful of identical 8x8 digits exist in the raw data, no more
    other = load_dataset(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(a.y_test, other.y_test)


def test_cifar10_fixture_loads_through_torchvision(cifar_root):
    ds = load_dataset(DataConfig(name="cifar10", root=str(cifar_root), verify_checksums=False))
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (30, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and 0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1
    assert ds.y_train.dtype == torch.int64 and int(ds.y_train.max()) < 10
    # pixel (0, 0) of the first image is byte 0 (red), 1024 (green), 2048 (blue) of its row
    import pickle

    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    assert ds.x_train[0, :, 0, 0].mul(255).round().long().tolist() == [int(row[0]), int(row[1024]), int(row[2048])]


def test_cifar10_checksums_are_verified_by_default(cifar_root):
    with pytest.raises(DataError, match="checksum"):
        load_dataset(DataConfig(name="cifar10", root=str(cifar_root)))


def test_cifar10_missing_and_truncated_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False))
    root = write_cifar10(tmp_path / "c")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(DataConfig(name="cifar10", root=str(root), verify_checksums=False))


NOBODY = 65534
UNPRIVILEGED_LOAD = """
import sys
from dvtrain.config import DataConfig
from dvtrain.data import DataError, load_dataset
try:
    load_dataset(DataConfig(name=sys.argv[1], root=sys.argv[2], verify_checksums=False))
except DataError as exc:
    print(exc)
"""


def _damage_fashion_mnist(tmp_path: Path) -> Path:
    """A Fashion-MNIST root whose unpacked training images are cut short; returns its raw folder."""
    _write_idx(tmp_path / "fm", 16)
    load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))
    raw = tmp_path / "fm" / "FashionMNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    return raw


@pytest.mark.parametrize("dataset", ["cifar10", "fashion_mnist"])
def test_damaged_data_files_are_never_advised_away(dataset, tmp_path):
    """Issue 28, kind 3: data files may be a user's only copy, or another user's: a damaged one is named,
    and the advice moves it aside (nothing deleted), or, for another user's folder, asks its owner."""
    if dataset == "cifar10":
        root = write_cifar10(tmp_path / "c")
        folder = root / "cifar-10-batches-py"
        batch = folder / "data_batch_3"
        batch.write_bytes(batch.read_bytes()[:500])
    else:
        root, folder = tmp_path / "fm", _damage_fashion_mnist(tmp_path)
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(DataError) as own:
        load_dataset(DataConfig(name=dataset, root=str(root), verify_checksums=False))
    assert f"move {folder} aside" in str(own.value) and "delete" not in str(own.value).replace("nothing is deleted", "")
    if os.geteuid() == 0:
        os.chown(folder, NOBODY, -1)
        with pytest.raises(DataError) as other:
            load_dataset(DataConfig(name=dataset, root=str(root), verify_checksums=False))
        assert "it belongs to nobody: ask them to repair it" in str(other.value) and "move" not in str(other.value)
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before


@pytest.mark.parametrize("dataset", ["cifar10", "fashion_mnist"])
def test_a_data_file_another_user_keeps_to_himself_is_named_unreadable(dataset, tmp_path):
    """A batch or idx file of another user that this user may not read is "permission denied", with its
    owner, never "not found", "checksum" or "damaged" (root's bypass dropped, as in test_shared_files)."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to take the permission bypass away")
    if dataset == "cifar10":
        root = write_cifar10(tmp_path / "c")
        hidden = root / "cifar-10-batches-py" / "data_batch_2"
    else:
        _write_idx(tmp_path / "fm", 16)
        root = tmp_path / "fm"
        load_dataset(DataConfig(name="fashion_mnist", root=str(root)))
        hidden = root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    os.chown(hidden, NOBODY, -1)
    hidden.chmod(0o600)
    done = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                           UNPRIVILEGED_LOAD, dataset, str(root)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"{hidden} cannot be read: permission denied (owner nobody, mode -rw-------)" in done.stdout, done.stdout
    assert not any(word in done.stdout for word in ("not found", "checksum", "are damaged", "corrupt")), done.stdout


def _write_idx(folder: Path, n: int) -> None:
    """Tiny Fashion-MNIST idx files, gzipped like Debian's package ships them."""
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images = struct.pack(">IIII", 2051, count, 28, 28) + bytes(range(256)) * (count * 784 // 256) + bytes(count * 784 % 256)
        labels = struct.pack(">II", 2049, count) + bytes(k % 10 for k in range(count))
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(images)
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(labels)


def test_fashion_mnist_unpacks_gz_files_from_root(tmp_path):
    _write_idx(tmp_path / "fm", 16)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))
    assert ds.x_train.shape == (16, 1, 28, 28) and ds.x_test.shape == (8, 1, 28, 28)
    assert ds.y_train.tolist() == [k % 10 for k in range(16)]
    assert (tmp_path / "fm" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr("dvtrain.data.FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_from_debian_package(tmp_path):
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10


def test_limits_keep_the_first_images():
    full = load_dataset(DataConfig(name="digits"))
    small = load_dataset(DataConfig(name="digits", train_limit=100, test_limit=10))
    assert torch.equal(small.x_train, full.x_train[:100]) and torch.equal(small.y_test, full.y_test[:10])


def test_batches_cover_the_data_once_and_repeat_with_the_seed():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    y = torch.arange(10)
    got = [b for _, b in batches(x, y, 4, torch.Generator().manual_seed(3), None)]
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(torch.cat(got).tolist()) == list(range(10))
    again = [b for _, b in batches(x, y, 4, torch.Generator().manual_seed(3), None)]
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_drop_last_gives_batches_of_one_shape():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    y = torch.arange(10)
    kept = [b for _, b in batches(x, y, 4, torch.Generator().manual_seed(3), None, drop_last=True)]
    assert [len(b) for b in kept] == [4, 4] == [4] * num_batches(10, 4, drop_last=True)
    full = [b for _, b in batches(x, y, 4, torch.Generator().manual_seed(3), None)]
    assert all(torch.equal(a, b) for a, b in zip(kept, full))  # the same order, only the tail dropped
    augmented = [b for b, _ in batches(x.expand(10, 1, 4, 4), y, 4, torch.Generator().manual_seed(3), 1, drop_last=True)]
    assert [b.shape for b in augmented] == [(4, 1, 4, 4)] * 2


def test_paired_batches_are_two_independent_orders():
    x = torch.arange(64.0).view(64, 1, 1, 1)
    y = torch.arange(64)
    pairs = list(paired_batches(x, y, 16, torch.Generator().manual_seed(0), None))
    assert len(pairs) == 4
    first = torch.cat([p[0][1] for p in pairs])
    second = torch.cat([p[1][1] for p in pairs])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(64))
    assert not torch.equal(first, second)


def test_augment_crops_and_flips_within_the_padding():
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, 2, *augmentation_draws(64, 2, torch.Generator().manual_seed(0)))
    assert out.shape == x.shape
    # every output is a shifted (and maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(64):
        windows = [padded[k, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[k], w) or torch.equal(out[k], w.flip(-1)) for w in windows)
    assert not torch.equal(out, x)


def test_cifar10_batch_with_code_in_it_is_refused(tmp_path):
    import pickle

    root = write_cifar10(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(DataConfig(name="cifar10", root=str(root), verify_checksums=False))
    assert not (tmp_path / "pwned").exists()
