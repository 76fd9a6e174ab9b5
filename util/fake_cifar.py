"""Write a small dataset in CIFAR-10's on-disk format (cifar-10-batches-py pickles).

For tests and for checking an install offline:
    python -m util.fake_cifar data_fake --per_batch 64
Each class has its own colour and stripe orientation, so the images are learnable.
"""
import argparse
import os
import pickle

import numpy as np


def make_images(n: int, rng: np.random.Generator):
    labels = rng.integers(0, 10, size=n)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.empty((n, 32, 32, 3), dtype=np.float32)
    for i, c in enumerate(labels):
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin((xx if c % 2 else yy) * (0.3 + 0.1 * (c // 2)) + phase)
        imgs[i] = colour * 0.6 + 60 * stripes[..., None] + rng.normal(0, 12, (32, 32, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8), labels


def write_fake_cifar10(root: str, per_batch: int = 32, test_size: int = 64, seed: int = 0) -> str:
    """Create ROOT/cifar-10-batches-py with 5 train batches and a test batch. Returns that folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        imgs, labels = make_images(test_size if name == "test_batch" else per_batch, rng)
        data = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)  # CIFAR stores CHW rows
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(),
                         b"data": data, b"filenames": [b"x.png"] * len(imgs)}, f)
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--per_batch", type=int, default=64, help="images per training batch file (5 files)")
    p.add_argument("--test_size", type=int, default=128)
    a = p.parse_args()
    print(write_fake_cifar10(a.root, a.per_batch, a.test_size))


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
