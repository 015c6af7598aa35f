"""Datasets as tensors on the device, and the batch streams the stages consume.

The datasets dvtrain targets are small enough to live on the device as one tensor of images in
[0, 1]; shuffling and augmentation happen there too, so no DataLoader worker sits in the hot loop.
Random numbers come from explicit CPU generators (see `dvtrain.rng`), so batches are identical on
every device and for every placement of the submodels.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from dvtrain import storage
from dvtrain.config import DataConfig
from dvtrain.errors import DvtrainError
from dvtrain.paths import PathError, check_folder, owner, unreadable
from dvtrain.splits import check_nonempty

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataError(DvtrainError):
    pass


@dataclass
class Dataset:
    name: str
    x_train: Tensor  # float32 [N, C, H, W] in [0, 1]
    y_train: Tensor  # int64 [N]
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training images: the models normalise with it internally."""
        return tuple(self.x_train.mean(dim=(0, 2, 3)).tolist())

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.x_train.std(dim=(0, 2, 3)).tolist())

    def to(self, device: torch.device | str) -> "Dataset":
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


# ----------------------------------------------------------------------------- loading


def load_dataset(cfg: DataConfig) -> Dataset:
    loader = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar10}[cfg.name]
    if loader is not _digits:  # digits come with scikit-learn; the others are read from data.root
        try:
            check_folder(Path(cfg.root), "data.root", f"point data.root at the folder that holds (or will hold) {cfg.name}")
        except PathError as exc:
            raise DataError(str(exc)) from None
    ds = loader(cfg)
    check_nonempty(len(ds.y_train), len(ds.y_test), cfg.name, "" if cfg.name == "digits" else f"under {cfg.root}")
    if cfg.train_limit:
        ds = replace(ds, x_train=ds.x_train[: cfg.train_limit], y_train=ds.y_train[: cfg.train_limit])
    if cfg.test_limit:
        ds = replace(ds, x_test=ds.x_test[: cfg.test_limit], y_test=ds.y_test[: cfg.test_limit])
    return ds


def _digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's 1797 handwritten 8x8 digits (shipped in its wheel), split by `data.split_seed`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / bunch.images.max()
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_test = round(len(y) * cfg.test_fraction)
    if n_test in (0, len(y)):  # (a fraction that rounds to no image, or to every image)
        split, bound = ("test", f"above {0.5 / len(y):.3g}") if n_test == 0 else ("training", f"below {1 - 0.5 / len(y):.5g}")
        raise DataError(f"data.test_fraction={cfg.test_fraction:g} leaves no digits image for the {split} split ({n_test} "
                        f"of {len(y)} go to the test split); set data.test_fraction {bound}")
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def _uint8_images(images: Tensor) -> Tensor:
    """[N, H, W] or [N, H, W, C] uint8 → float32 [N, C, H, W] in [0, 1]."""
    images = torch.as_tensor(images)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.float().div_(255.0).contiguous()


def _damaged_data(folder: Path, restore: str) -> str:
    """What to do about damaged data files, which may be a user's only copy or another user's: never to
    delete them; move them aside (nothing is lost) and `restore`, or ask their owner."""
    other = owner(folder)
    if other is not None:
        return f"it belongs to {other}: ask them to repair it, or point data.root at a copy of your own"
    return f"move {folder} aside (e.g. to {folder.name}.damaged; nothing is deleted) and {restore}"


def _fashion_mnist(cfg: DataConfig) -> Dataset:
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root)
    _prepare_fashion_mnist_raw(root)
    try:
        train = FashionMNIST(str(root), train=True, download=False)
        test = FashionMNIST(str(root), train=False, download=False)
    except PermissionError as exc:
        raise DataError(unreadable(Path(exc.filename or root), "Fashion-MNIST file")) from None
    except (RuntimeError, ValueError, OSError) as exc:
        raw = root / "FashionMNIST" / "raw"
        raise DataError(
            f"Fashion-MNIST files under {raw} are damaged ({exc}); {_damaged_data(raw, 'run again to unpack fresh copies')}"
        ) from None
    return Dataset(
        "fashion_mnist",
        _uint8_images(train.data),
        train.targets.long(),
        _uint8_images(test.data),
        test.targets.long(),
        num_classes=10,
    )


def _prepare_fashion_mnist_raw(root: Path) -> None:
    """Make `<root>/FashionMNIST/raw/` hold the four uncompressed idx files torchvision reads.

    Debian's `dataset-fashion-mnist` ships recompressed `.gz` files whose md5 differs from the ones
    torchvision knows, so torchvision would try to download; unpacking them ourselves and loading
    with `download=False` avoids that.
    """
    raw = root / "FashionMNIST" / "raw"
    missing = [name for name in FASHION_MNIST_FILES if not (raw / name).is_file()]
    if not missing:
        return
    sources = [raw, root, root / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    found = {}
    for name in missing:
        for folder in sources:
            if (folder / f"{name}.gz").is_file():
                found[name] = folder / f"{name}.gz"
                break
    still_missing = [name for name in missing if name not in found]
    if still_missing:
        raise DataError(
            f"Fashion-MNIST file {still_missing[0]}(.gz) not found in {root} or {FASHION_MNIST_SYSTEM_DIR}; "
            "install it with `apt-get install dataset-fashion-mnist` or point data.root at a folder holding the .gz files"
        )
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {raw} ({exc.strerror}); point data.root at a writable folder") from None
    for name, source in found.items():
        try:
            with storage.replacing(raw / name, "Fashion-MNIST file") as tmp, gzip.open(source, "rb") as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            raise DataError(f"cannot unpack {source} ({exc}); reinstall dataset-fashion-mnist or replace the file") from None


# What the python version of CIFAR-10 may contain: dicts, lists, strings and numpy arrays.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array reconstruction: a tampered batch file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _check_cifar_files(folder: Path, names: list[str]) -> None:
    """CIFAR-10's batches are pickles, which torchvision loads as they are; vet them first."""
    for name in names:
        path = folder / name
        if path.is_file():
            with open(path, "rb") as f:
                _ArraysOnlyUnpickler(f, encoding="latin1").load()


def _cifar10(cfg: DataConfig) -> Dataset:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    cls = CIFAR10
    if not cfg.verify_checksums:

        class CIFAR10Unverified(CIFAR10):
            """torchvision's reader with no md5 to check (torchvision then checks only that files exist)."""

            train_list = [[name, None] for name, _ in CIFAR10.train_list]
            test_list = [[name, None] for name, _ in CIFAR10.test_list]
            meta = {**CIFAR10.meta, "md5": None}

        cls = CIFAR10Unverified
    folder = Path(cfg.root) / "cifar-10-batches-py"
    try:
        if cfg.download and not folder.is_dir():
            download_and_extract_archive(CIFAR10.url, cfg.root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        _check_cifar_files(folder, [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]])
        train = cls(cfg.root, train=True)
        test = cls(cfg.root, train=False)
    except PermissionError as exc:
        raise DataError(unreadable(Path(exc.filename or folder), "CIFAR-10 batch file")) from None
    except (RuntimeError, OSError):
        raise DataError(
            f"CIFAR-10 batches not found or failing their checksum under {folder}; set data.download=true on a "
            "machine with internet, or copy the python version (cifar-10-batches-py) there"
        ) from None
    except (EOFError, pickle.UnpicklingError, KeyError, ValueError) as exc:
        raise DataError(
            f"CIFAR-10 batch files under {folder} are truncated or corrupt ({type(exc).__name__}); "
            f"{_damaged_data(folder, 'download or copy it again')}"
        ) from None
    return Dataset(
        "cifar10",
        _uint8_images(train.data),
        torch.tensor(train.targets, dtype=torch.int64),
        _uint8_images(test.data),
        torch.tensor(test.targets, dtype=torch.int64),
        num_classes=10,
    )


# ----------------------------------------------------------------------------- batches


def augmentation_draws(n: int, padding: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """An epoch's random crops and flips for n images: offsets [2, n] in 0..2·padding, flips [n] bool.

    Drawn once per epoch (on the CPU generator, then one copy to the device), so no training step
    waits for a host→device copy."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


def augment(x: Tensor, padding: int, offsets: Tensor, flips: Tensor) -> Tensor:
    """Random crop with zero padding and random horizontal flip, per image, vectorised on x's device.

    x [n, C, H, W]; offsets [2, n] (rows, columns) and flips [n] from `augmentation_draws`, on x's device.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    return torch.where(flips[:, None, None, None], cropped.flip(-1), cropped)


def batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, augment_padding: int | None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over (x, y); `augment_padding` None means no augmentation; `drop_last` skips
    the last partial batch, so every batch has the same shape (what a captured step needs).

    Everything random is drawn at the start of the pass, so the batches themselves never wait for
    the host."""
    order = torch.randperm(len(y), generator=generator).to(y.device)
    if augment_padding is not None:
        offsets, flips = (t.to(y.device) for t in augmentation_draws(len(y), augment_padding, generator))
    for start in range(0, num_batches(len(y), batch_size, drop_last) * batch_size, batch_size):
        idx = order[start : start + batch_size]
        xb = x[idx]
        if augment_padding is not None:
            xb = augment(xb, augment_padding, offsets[:, start : start + batch_size], flips[start : start + batch_size])
        yield xb, y[idx]


def paired_batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, augment_padding: int | None,
    drop_last: bool = False,
) -> Iterator[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """((x, y), (x_s, y_s)) from two independently shuffled passes, as the reference code pairs them."""
    return zip(
        batches(x, y, batch_size, generator, augment_padding, drop_last),
        batches(x, y, batch_size, generator, augment_padding, drop_last),
    )


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over n images."""
    return n // batch_size if drop_last else -(-n // batch_size)
