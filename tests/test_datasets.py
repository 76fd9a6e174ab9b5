"""Dataset readers: CIFAR-10 pickles and Fashion-MNIST idx files, checked by structure."""
import gzip
import json

import numpy as np
import pytest

from conftest import run_main, smoke_args
from util.datasets import read_cifar10, read_fashion_mnist
from util.errors import UserError
from util.fake_cifar import write_fake_fashion_mnist


def test_cifar_reader_shapes(cifar_root):
    x, y = read_cifar10(cifar_root, train=True)
    assert x.shape == (160, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (160,)


def test_fashion_mnist_idx_reader(tmp_path):
    write_fake_fashion_mnist(str(tmp_path), n_train=20, n_test=8)
    x, y = read_fashion_mnist(str(tmp_path), train=True)
    assert x.shape == (20, 32, 32, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    assert (x[:, :2] == 0).all() and (x[:, :, -2:] == 0).all()  # zero padding 28 -> 32
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    assert raw[:4] == b"\0\0\x08\x03" and int.from_bytes(raw[4:8], "big") == 8
    xt, _ = read_fashion_mnist(str(tmp_path), train=False)
    assert np.array_equal(xt[:, 2:30, 2:30, 0], np.frombuffer(raw[16:], np.uint8).reshape(8, 28, 28))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(UserError, match="truncated"):
        read_fashion_mnist(str(tmp_path), train=False)


@pytest.mark.parametrize("loader", ["in_memory", "torchvision"])
def test_fashion_mnist_pretrain_and_probe(tmp_path, loader):
    root = write_fake_fashion_mnist(str(tmp_path / "fm"), n_train=160, n_test=64)
    common = ("--dataset", "fashion_mnist", "--data_loader", loader, "--epochs", "1", "--warmup_epochs", "0")
    run_main("main_pretrain", *smoke_args(root, tmp_path / "pre", *common, "--target", "ema", "--wse", "0",
                                          "--knn_every", "1"))
    with open(tmp_path / "pre" / "log.txt") as f:
        assert "knn_acc" in json.loads(f.readline())
    run_main("main_linprobe", *smoke_args(root, tmp_path / "lp", *common, "--finetune",
                                          tmp_path / "pre" / "checkpoint-last.pth"))
    with open(tmp_path / "lp" / "results.json") as f:
        assert json.load(f)["last_acc1"] >= 0


def test_train_subset_limits_the_training_set(cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--train_subset", "64", "--epochs", "1",
                                          "--warmup_epochs", "0"))
    with open(tmp_path / "log.txt") as f:
        assert json.loads(f.readline())["step"] == 64 // 32
