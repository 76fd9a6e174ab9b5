"""Write small datasets in the real on-disk formats: CIFAR-10, CIFAR-100, Fashion-MNIST, image folder.

For tests and for checking an install offline:
    python -m dataio.fake data_fake --per_batch 64
Each class has its own colour and stripe orientation, so the images are learnable.
"""
import os
import pickle
from typing import Sequence

import numpy as np
from util.errors import ArgumentParser, cli


def _class_image(c: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """One (32, 32, 3) float image of class c: its colour, its stripes at a random phase, noise."""
    colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin((xx if c % 2 else yy) * (0.3 + 0.1 * (c // 2)) + phase)
    return colour * 0.6 + 60 * stripes[..., None] + rng.normal(0, 12, (32, 32, 3))


def make_images(n: int, rng: np.random.Generator, num_classes: int = 10):
    """n images (n, 32, 32, 3) uint8 with random labels (n,) in 0..num_classes-1."""
    labels = rng.integers(0, num_classes, size=n)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.empty((n, 32, 32, 3), dtype=np.float32)
    for i, c in enumerate(labels):
        imgs[i] = _class_image(int(c), rng, yy, xx)
    return np.clip(imgs, 0, 255).astype(np.uint8), labels


def _cifar_rows(imgs: np.ndarray) -> np.ndarray:
    return imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)  # CIFAR stores CHW rows


def write_fake_cifar10(root: str, per_batch: int = 32, test_size: int = 64, seed: int = 0) -> str:
    """Create ROOT/cifar-10-batches-py with 5 train batches and a test batch. Returns that folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        imgs, labels = make_images(test_size if name == "test_batch" else per_batch, rng)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(),
                         b"data": _cifar_rows(imgs), b"filenames": [b"x.png"] * len(imgs)}, f)
    return folder


def write_fake_cifar100(root: str, n_train: int = 400, n_test: int = 200, seed: int = 0) -> str:
    """Create ROOT/cifar-100-python/{train,test} (100 fine, 20 coarse classes). Returns that folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        imgs, labels = make_images(n, rng, num_classes=100)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": name.encode(),
                         b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                         b"data": _cifar_rows(imgs)}, f)
    return folder


def write_fake_fashion_mnist(root: str, n_train: int = 160, n_test: int = 64, seed: int = 0) -> str:
    """Write the four Fashion-MNIST files in the real idx format (gzipped) with learnable images."""
    import gzip
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs, labels = make_images(n, rng)
        gray = imgs.mean(axis=3)[:, 2:30, 2:30].astype(np.uint8)  # 28x28, one channel
        for name, arr in ((f"{prefix}-images-idx3-ubyte", gray), (f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            with gzip.open(os.path.join(root, name + ".gz"), "wb") as f:
                f.write(header + arr.tobytes())
    return root


def write_fake_image_folder(root: str, n_per_class: int = 12, classes: Sequence[str] = ("bird", "cat", "ship"),
                            seed: int = 0) -> str:
    """Write ROOT/{train,val}/CLASS/NNNN.png, n_per_class 32x32 RGB PNGs per class and split.

    The image of class folder `classes[i]` looks like the other fakes' class i. PNG is lossless,
    so the files read back exactly. Returns ROOT, the data_path to pass.
    """
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for j in range(n_per_class):
                img = np.clip(_class_image(c, rng, yy, xx), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, name, f"{j:04d}.png"))
    return root


@cli
def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--per_batch", type=int, default=64, help="images per training batch file (5 files)")
    p.add_argument("--test_size", type=int, default=128)
    a = p.parse_args(argv)
    print(write_fake_cifar10(a.root, a.per_batch, a.test_size))


if __name__ == "__main__":
    main()
