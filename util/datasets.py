"""Datasets as uint8 arrays in memory, plus the classic per-image torchvision pipeline.

CIFAR-10 is read straight from its `cifar-10-batches-py` pickles with a small reader that
checks structure (keys, shapes, dtypes), not md5: torchvision's CIFAR10 class refuses any
copy whose checksums differ from the official release, so it is used only to download.
"""
import gzip
import os
import pickle
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from util.errors import UserError

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


def _cifar_dir(root: str) -> str:
    """Accept either the parent folder or cifar-10-batches-py itself."""
    if os.path.basename(os.path.normpath(root)) == CIFAR10_DIR:
        return root
    return os.path.join(root, CIFAR10_DIR)


def _read_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated file, not a pickle, ...
        raise UserError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__})")
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise UserError(f"{path}: not a CIFAR-10 batch (expected keys b'data' and b'labels')")
    data, labels = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{path}: not a CIFAR-10 batch (data {data.dtype} {data.shape}, "
                        f"{len(labels)} labels; expected uint8 (N, 3072) and N labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def read_cifar10(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Returns images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    folder = _cifar_dir(root)
    parts = [_read_batch(os.path.join(folder, name))
             for name in (CIFAR10_TRAIN if train else CIFAR10_TEST)]
    return (np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
            np.concatenate([p[1] for p in parts]))


def ensure_cifar10(root: str, download: bool = True) -> None:
    """Make sure the CIFAR-10 pickles are at `root`, downloading the official archive if not."""
    folder = _cifar_dir(root)
    names = CIFAR10_TRAIN + CIFAR10_TEST
    if all(os.path.isfile(os.path.join(folder, n)) for n in names):
        return
    if os.path.isfile(root):
        raise UserError(f"data_path {root} is a file; pass the folder that holds {CIFAR10_DIR}/")
    if os.path.isdir(folder):  # a partial or foreign copy: do not download over it
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        raise UserError(f"{folder} is incomplete (missing {', '.join(missing)}); "
                        f"remove it to re-download or fix the copy")
    hint = (f"CIFAR-10 not found at {root} and could not be downloaded; put the extracted "
            f"cifar-10-python.tar.gz ({CIFAR10_DIR}/) there or pass --data_path")
    if not download:
        raise UserError(hint)
    try:
        from torchvision.datasets import CIFAR10
        CIFAR10(root, train=True, download=True)
    except Exception as e:
        raise UserError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _read_idx(root: str, name: str, ndim: int) -> np.ndarray:
    """One file of the MNIST idx format (plain or .gz): magic 0x0000 08 NDIM, big-endian dims."""
    for path in (os.path.join(root, name), os.path.join(root, name + ".gz")):
        if os.path.isfile(path):
            break
    else:
        raise UserError(f"Fashion-MNIST file {name}[.gz] not found in {root} (Debian: apt-get install "
                        f"dataset-fashion-mnist, then --data_path /usr/share/datasets/fashion-mnist)")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim or data[:3] != b"\0\0\x08" or data[3] != ndim:
        raise UserError(f"{path}: not an idx file of uint8 with {ndim} dimensions")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    if len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        raise UserError(f"{path}: truncated idx file")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Returns images (N, 32, 32, 1) uint8 and labels (N,) int64.

    The 28x28 images are zero-padded (2 pixels a side, the background is black) to 32x32 so
    the 4x4-patch models see an 8x8 grid; grayscale stays one channel (models get in_chans=1).
    """
    images = _read_idx(root, FASHION_FILES[train][0], 3)
    labels = _read_idx(root, FASHION_FILES[train][1], 1).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} Fashion-MNIST images but {len(labels)} labels")
    return np.ascontiguousarray(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]), labels


def load_dataset(name: str, root: str, train: bool, download: bool = True
                 ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Returns images (N, H, W, C) uint8, labels (N,) int64, number of classes."""
    if name == "fashion_mnist":
        images, labels = read_fashion_mnist(root, train)
        return images, labels, 10
    if name != "cifar10":
        raise UserError(f"unknown dataset {name!r}")
    ensure_cifar10(root, download)
    images, labels = read_cifar10(root, train)
    if len(images) == 0:
        raise UserError(f"{root}: the CIFAR-10 files hold no images")
    return images, labels, 10


def load_train(cfg) -> Tuple[np.ndarray, np.ndarray, int]:
    """The training set, cut to its first cfg.train_subset images when that is set."""
    images, labels, num_classes = load_dataset(cfg.dataset, cfg.data_path, train=True)
    if cfg.train_subset:
        images, labels = images[:cfg.train_subset], labels[:cfg.train_subset]
    return images, labels, num_classes


def load_splits(cfg):
    """Train and test sets of cfg.dataset: (train_x, train_y, test_x, test_y, num_classes)."""
    from util.distributed import world
    train_x, train_y, num_classes = load_train(cfg)
    test_x, test_y, _ = load_dataset(cfg.dataset, cfg.data_path, train=False)
    if len(train_x) < cfg.batch_size * world():
        raise UserError(f"batch_size {cfg.batch_size} x {world()} ranks is larger than the dataset "
                        f"({len(train_x)} images)")
    return train_x, train_y, test_x, test_y, num_classes


def dataset_stats(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std used for normalisation."""
    return (FASHION_MEAN, FASHION_STD) if name == "fashion_mnist" else (CIFAR10_MEAN, CIFAR10_STD)


class ArrayDataset(Dataset):
    """uint8 images (N, H, W, C) + labels through a per-image PIL transform (the classic path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)  # grayscale: mode "L"
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def pretrain_transform(img_size: int, mean, std) -> transforms.Compose:
    """RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + normalisation (MAE's)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])


def eval_transform(mean, std) -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def seeded_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order and worker seeds of an epoch depend only on (seed, epoch): exact resume."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)
