"""Dataset readers: CIFAR-10/100 pickles, Fashion-MNIST idx files, image folders, checked by structure."""
import gzip
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main, smoke_args
from dataio.datasets import (DATASETS, STATS, dataset_stats, load_dataset, read_cifar10, read_cifar100,
                             read_fashion_mnist, read_image_folder)
from util.errors import UserError
from dataio.fake import write_fake_cifar100, write_fake_fashion_mnist, write_fake_image_folder


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


@pytest.mark.slow
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


# ---- CIFAR-100 --------------------------------------------------------------------------------

def test_cifar100_round_trip(tmp_path):
    folder = write_fake_cifar100(str(tmp_path), n_train=300, n_test=50, seed=1)
    x, y, num_classes = load_dataset("cifar100", str(tmp_path), train=True, download=False)
    assert x.shape == (300, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (300,) and y.dtype == np.int64
    assert num_classes == 100 and 0 <= y.min() and 9 < y.max() <= 99
    with open(os.path.join(folder, "train"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert np.array_equal(y, raw[b"fine_labels"])  # the fine labels, not the coarse ones
    assert np.array_equal(x[7, 3, 5], raw[b"data"][7, [3 * 32 + 5, 1024 + 3 * 32 + 5, 2048 + 3 * 32 + 5]])
    xt, yt = read_cifar100(folder, train=False)  # the cifar-100-python folder itself is accepted too
    assert xt.shape == (50, 32, 32, 3) and yt.shape == (50,)
    assert dataset_stats("cifar100") == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def test_cifar100_downloads_only_when_absent(tmp_path, monkeypatch):
    import torchvision.datasets
    calls = []

    def fake_download(root, train, download):
        calls.append(root)
        write_fake_cifar100(root, n_train=20, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    _, _, n = load_dataset("cifar100", str(tmp_path), train=False)
    assert calls == [str(tmp_path)] and n == 100
    load_dataset("cifar100", str(tmp_path), train=True)
    assert len(calls) == 1  # present now: no second download
    with pytest.raises(UserError, match="CIFAR-100 not found.*cifar-100-python"):
        load_dataset("cifar100", str(tmp_path / "elsewhere"), train=True, download=False)


def test_cifar100_truncated_or_foreign_file(tmp_path):
    folder = write_fake_cifar100(str(tmp_path), n_train=40, n_test=10)
    path = os.path.join(folder, "train")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])
    with pytest.raises(UserError, match=f"^{path}: not a readable CIFAR-100 batch"):
        read_cifar100(str(tmp_path), train=True)
    with open(path, "wb") as f:  # a CIFAR-10 batch where CIFAR-100 is expected: no fine labels
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(UserError, match="fine_labels"):
        load_dataset("cifar100", str(tmp_path), train=True)


# ---- image folder -----------------------------------------------------------------------------

def test_image_folder_round_trip(tmp_path):
    classes = ("ship", "bird", "cat")  # written unsorted: labels follow the sorted folder names
    root = write_fake_image_folder(str(tmp_path), n_per_class=3, classes=classes)
    wide = np.tile(np.arange(0, 240, 4, dtype=np.uint8), (40, 1))  # 40 x 60 horizontal ramp
    Image.fromarray(np.stack([wide, wide[::-1], 255 - wide], -1)).save(tmp_path / "train" / "cat" / "zz_wide.png")
    gray = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 251
    Image.fromarray(gray.astype(np.uint8), mode="L").save(tmp_path / "train" / "cat" / "zz_gray.png")
    x, y, num_classes = load_dataset("image_folder", root, train=True)
    assert x.shape == (11, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64 and num_classes == 3
    expected = [(np.asarray(Image.open(tmp_path / "train" / c / f)), i)
                for i, c in enumerate(sorted(classes)) for f in sorted(os.listdir(tmp_path / "train" / c))]
    assert y.tolist() == [label for _, label in expected] == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    for i, (want, _) in enumerate(expected):  # the writer's 32x32 RGB PNGs come back exactly
        if i not in (6, 7):  # cat/zz_gray.png, cat/zz_wide.png
            assert np.array_equal(x[i], want), i
    assert np.array_equal(x[6], np.repeat(gray.astype(np.uint8)[..., None], 3, -1))  # L -> RGB
    # non-square: shorter side to 32 (60x40 -> 48x32, bicubic), then the central 32 columns
    want = np.asarray(Image.open(tmp_path / "train" / "cat" / "zz_wide.png").resize((48, 32), Image.BICUBIC))
    assert np.array_equal(x[7], want[:, 8:40]) and not np.array_equal(x[7], want[:, :32])
    xv, yv, _ = load_dataset("image_folder", root, train=False)
    assert xv.shape == (9, 32, 32, 3) and yv.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    os.rename(tmp_path / "val", tmp_path / "test")  # test/ stands in for val/
    assert np.array_equal(read_image_folder(root, train=False)[0], xv)
    assert dataset_stats("image_folder") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's


def _no_val(root):
    shutil.rmtree(os.path.join(root, "val"))


def _mismatch(root):
    os.rename(os.path.join(root, "val", "ship"), os.path.join(root, "val", "dog"))


def _empty_val(root):
    for c in os.listdir(os.path.join(root, "val")):
        for f in os.listdir(os.path.join(root, "val", c)):
            os.rename(os.path.join(root, "val", c, f), os.path.join(root, "val", c, f + ".txt"))


def _no_class_folders(root):
    shutil.rmtree(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "train"))


def _unreadable(root):
    with open(os.path.join(root, "train", "cat", "0001.png"), "wb") as f:
        f.write(b"\x89PNG\r\n not really")


@pytest.mark.parametrize("break_it,train,message", [
    (lambda root: shutil.rmtree(root), True, "data_path .* is not a folder"),
    (_no_val, True, "has neither a val/ nor a test/ folder"),
    (_mismatch, True, r"different class folders \(only in train/: ship; only in val/: dog\)"),
    (_empty_val, False, r"val: no images \(.jpg"),
    (_no_class_folders, True, "train: no class folders"),
    (_unreadable, True, r"cat.0001.png: not a readable image"),
])
def test_image_folder_errors(tmp_path, break_it, train, message):
    root = write_fake_image_folder(str(tmp_path / "data"), n_per_class=2, classes=("bird", "cat", "ship"))
    load_dataset("image_folder", root, train=train)  # fine before it is broken
    break_it(root)
    with pytest.raises(UserError, match=message) as e:
        load_dataset("image_folder", root, train=train)
    assert "\n" not in str(e.value)


def test_image_folder_pretrain(tmp_path):
    root = write_fake_image_folder(str(tmp_path / "data"), n_per_class=12, classes=("bird", "cat", "ship"))
    run_main("main_pretrain", *smoke_args(root, tmp_path / "out", "--dataset", "image_folder", "--epochs", "1",
                                          "--knn_every", "1"))
    ckpt = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["dataset"] == "image_folder"
    assert ckpt["model"]["encoder.patch_embed.proj.weight"].shape[1] == 3  # RGB in
    with open(tmp_path / "out" / "log.txt") as f:
        assert 0 <= json.loads(f.readline())["knn_acc"] <= 100


# ---- all datasets -----------------------------------------------------------------------------

def test_stats_match_channels_for_every_dataset(cifar_root, tmp_path):
    roots = {"cifar10": cifar_root, "cifar100": str(tmp_path / "c100"), "fashion_mnist": str(tmp_path / "fm"),
             "image_folder": str(tmp_path / "if")}
    write_fake_cifar100(roots["cifar100"], n_train=20, n_test=10)
    write_fake_fashion_mnist(roots["fashion_mnist"], n_train=20, n_test=8)
    write_fake_image_folder(roots["image_folder"], n_per_class=2)
    assert set(DATASETS) == set(STATS) == set(roots)
    for name, root in roots.items():
        x, _, num_classes = load_dataset(name, root, train=False, download=False)
        mean, std = dataset_stats(name)
        assert len(mean) == len(std) == x.shape[3] == (1 if name == "fashion_mnist" else 3), name
        assert all(0 < v < 1 for v in mean + std), name
        assert num_classes == {"cifar100": 100, "image_folder": 3}.get(name, 10), name
    with pytest.raises(UserError, match="unknown dataset 'svhn'"):
        dataset_stats("svhn")
