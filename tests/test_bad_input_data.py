"""Bad-input catalogue, data and checkpoints: dataset files, checkpoints and kNN weights.

Every case ends as the README promises: one line on stderr naming the cause, exit code 2,
before any training; reader-level cases expect the UserError that the scripts turn into that.
"""
import gzip
import os
import pickle
import re
import urllib.error

import numpy as np
import pytest
import torch

from conftest import run_main, smoke_args
from dataio.datasets import load_dataset, read_cifar10, read_cifar100, read_fashion_mnist
from dataio.fake import write_fake_cifar10, write_fake_cifar100, write_fake_fashion_mnist, write_fake_image_folder
from engine_eval import knn_accuracy
import models_vit
from util.checkpoint import load_checkpoint
from util.errors import UserError

FM_LABELS = "train-labels-idx1-ubyte.gz"
FM_IMAGES = "train-images-idx3-ubyte.gz"


def refused(capsys, module, *args, match):
    """Run a script's main in-process; assert exit 2 and one stderr line matching `match`."""
    with pytest.raises(SystemExit) as e:
        run_main(module, *args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(match, err), err
    return err


def one_line(match, fn, *args, **kwargs):
    """fn(*args) raises a one-line UserError matching `match`; returns the message."""
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- Fashion-MNIST: gzip and idx files --------------------------------------------------------

def _fashion(tmp_path, n_train=40, n_test=16):
    return write_fake_fashion_mnist(str(tmp_path / "fm"), n_train=n_train, n_test=n_test)


def _gz_rewrite(path, change):
    """Decompress `path`, apply `change` (bytes -> bytes), gzip it back."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(change(raw))


def _bad_crc(path):
    data = bytearray(open(path, "rb").read())
    data[-8] ^= 0xFF  # the gzip trailer: CRC-32, then the length
    open(path, "wb").write(bytes(data))


def _truncated(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _not_gzip(path):
    open(path, "wb").write(b"<html>404 not found</html>")


def _corrupt_deflate(path):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 20] = b"\xff" * 20  # inside the deflate stream
    open(path, "wb").write(bytes(data))


def _empty(path):
    open(path, "wb").close()


@pytest.mark.parametrize("damage,message", [
    (_bad_crc, "corrupt gzip file .*CRC"),
    (_truncated, "truncated gzip file"),
    (_not_gzip, "corrupt gzip file .*Not a gzipped file"),
    (_corrupt_deflate, "corrupt gzip file"),
    (_empty, "not an idx file .*empty file"),
])
def test_fashion_mnist_damaged_gzip(tmp_path, damage, message):
    root = _fashion(tmp_path)
    damage(os.path.join(root, FM_IMAGES))
    err = one_line(message, read_fashion_mnist, root, train=True)
    assert err.startswith(os.path.join(root, FM_IMAGES))


def test_fashion_mnist_corrupt_gzip_end_to_end(tmp_path, capsys):
    root = _fashion(tmp_path)
    _bad_crc(os.path.join(root, FM_LABELS))
    refused(capsys, "main_pretrain", *smoke_args(root, tmp_path / "out", "--dataset", "fashion_mnist"),
            match=f"{FM_LABELS}: corrupt gzip file")


def _set_label(raw, value):
    return raw[:8] + bytes([value]) + raw[9:]  # the first label (header: magic + 1 dim)


def test_fashion_mnist_label_out_of_range_end_to_end(tmp_path, capsys):
    """A label of 200 used to pretrain fine, then crash fine-tuning and kNN (index out of bounds)."""
    root = _fashion(tmp_path)
    _gz_rewrite(os.path.join(root, FM_LABELS), lambda raw: _set_label(raw, 200))
    refused(capsys, "main_pretrain", *smoke_args(root, tmp_path / "out", "--dataset", "fashion_mnist"),
            match=rf"{FM_LABELS}: label 200 \(image 0\) is outside 0..9")


@pytest.mark.parametrize("change,message", [
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], r"an idx file of float32 values, expected uint8"),  # float labels
    (lambda raw: raw + b"\0" * 7, r"7 bytes after the data its header announces"),
    (lambda raw: raw[:4] + (2 ** 32 - 1).to_bytes(4, "big") + raw[8:], "truncated idx file"),
    (lambda raw: raw[:3] + b"\x02" + raw[4:], "not an idx file of uint8 with 1 dimensions"),
])
def test_fashion_mnist_bad_idx_labels(tmp_path, change, message):
    root = _fashion(tmp_path)
    _gz_rewrite(os.path.join(root, FM_LABELS), change)
    one_line(f"{FM_LABELS}: {message}", read_fashion_mnist, root, train=True)


def test_fashion_mnist_image_and_label_counts_and_shape(tmp_path):
    root = _fashion(tmp_path, n_train=40)
    _gz_rewrite(os.path.join(root, FM_LABELS), lambda raw: raw[:4] + (39).to_bytes(4, "big") + raw[8:-1])
    one_line(f"40 images in .*{FM_IMAGES} but 39 labels in .*{FM_LABELS}", read_fashion_mnist, root, train=True)
    root = _fashion(tmp_path / "b", n_train=40)  # 40 images of 28x28 declared as 80 of 28x14
    _gz_rewrite(os.path.join(root, FM_IMAGES),
                lambda raw: raw[:4] + b"".join(d.to_bytes(4, "big") for d in (80, 28, 14)) + raw[16:])
    one_line(f"{FM_IMAGES}: images of 28x14, Fashion-MNIST's are 28x28", read_fashion_mnist, root, train=True)


# ---- CIFAR pickles ----------------------------------------------------------------------------

def _rewrite_batch(path, **entries):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d.update({k.encode(): v for k, v in entries.items()})
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _cifar10(tmp_path):
    write_fake_cifar10(str(tmp_path / "c10"), per_batch=8, test_size=8)
    return str(tmp_path / "c10"), str(tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3")


@pytest.mark.parametrize("labels,message", [
    ([b"1"] * 8, r"labels are byte strings \(e.g. np.bytes_\(b'1'\)\), expected integers 0..9"),
    ([1.0] * 7 + [2.5], r"labels are floats .*expected integers 0..9"),  # not truncated silently
    ([0] * 7 + [10], r"label 10 \(image 7\) is outside 0..9"),
    ([-1] * 8, r"label -1 \(image 0\) is outside 0..9, the dataset has 10 classes; 8 of 8 labels are"),
    (5, r"labels have shape \(\), expected one integer per image"),
    ([[1, 2], [3]] * 4, r"labels are not a flat list of integers"),
    ([1] * 7, r"8 images but 7 labels"),
])
def test_cifar_bad_labels(tmp_path, labels, message):
    root, batch = _cifar10(tmp_path)
    _rewrite_batch(batch, labels=labels)
    one_line(f"^{batch}.*{message}", read_cifar10, root, train=True)


def test_cifar_labels_as_byte_strings_end_to_end(tmp_path, capsys):
    root, batch = _cifar10(tmp_path)
    _rewrite_batch(batch, labels=[str(i % 10).encode() for i in range(8)])
    refused(capsys, "main_pretrain", *smoke_args(root, tmp_path / "out"), match=f"{batch}.*byte strings")


def test_cifar100_fine_label_out_of_range(tmp_path):
    folder = write_fake_cifar100(str(tmp_path), n_train=20, n_test=10)
    _rewrite_batch(os.path.join(folder, "test"), fine_labels=[100] * 10)
    one_line(r"test \(fine_labels\): label 100 \(image 0\) is outside 0..99", read_cifar100, str(tmp_path),
             train=False)


@pytest.mark.parametrize("data,message", [
    (np.zeros((8, 1024), np.uint8), r"data uint8 \(8, 1024\); expected uint8 \(N, 3072\)"),  # one channel
    (np.zeros((8, 3072), np.float32), r"data float32 \(8, 3072\)"),
    ([b"abc"] * 8, r"data \|S3 \(8,\)"),
    ([[0] * 3072, [0]] * 4, r"data object \(\)"),  # ragged rows
])
def test_cifar_bad_image_arrays(tmp_path, data, message):
    root, batch = _cifar10(tmp_path)
    _rewrite_batch(batch, data=data)
    one_line(rf"{batch}: not a CIFAR-10 batch \({message}", read_cifar10, root, train=True)


def test_cifar_empty_and_code_running_pickles(tmp_path):
    root, batch = _cifar10(tmp_path)
    open(batch, "wb").close()
    one_line(f"{batch}: not a readable CIFAR-10 batch .empty or truncated file", read_cifar10, root, train=True)
    marker = tmp_path / "ran"

    class Payload:  # a pickle that would create `marker` when loaded
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    with open(batch, "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    one_line(r"not a readable CIFAR-10 batch \(UnpicklingError: holds a posix.mkdir object\)",
             read_cifar10, root, train=True)
    assert not marker.exists()  # refused before anything ran


def test_cifar_dataset_pointed_at_the_other_cifar(tmp_path, monkeypatch):
    import torchvision.datasets
    folder = write_fake_cifar100(str(tmp_path), n_train=20, n_test=10)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("no download"))
    one_line(r"cifar-100-python is the CIFAR-100 folder, not CIFAR-10: pass --dataset cifar100$",
             load_dataset, "cifar10", folder, train=True)


# ---- data folders: permissions, files in the path, failed downloads ---------------------------

def _deny(monkeypatch, locked):
    """os.stat and os.listdir refuse everything under `locked`, as chmod 000 would for a non-root
    user (the tests may run as root, which chmod does not stop)."""
    real_stat, real_listdir = os.stat, os.listdir

    def check(path):
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: check(p) or real_stat(p, *a, **k))
    monkeypatch.setattr(os, "listdir", lambda p=".": check(p) or real_listdir(p))


def test_unreadable_data_folder_says_permission_denied(cifar_root, tmp_path, monkeypatch, capsys):
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("must not download"))
    _deny(monkeypatch, cifar_root)
    err = refused(capsys, "main_pretrain", *smoke_args(cifar_root, tmp_path / "out"),
                  match=f"cannot access {cifar_root}.*Permission denied")
    assert "download" not in err and "not found" not in err


def test_unreadable_fashion_and_image_folders(tmp_path, monkeypatch):
    fm = _fashion(tmp_path)
    images = write_fake_image_folder(str(tmp_path / "if"), n_per_class=2)
    _deny(monkeypatch, fm)
    one_line(f"cannot access {fm}.*Permission denied", read_fashion_mnist, fm, train=True)
    monkeypatch.undo()
    _deny(monkeypatch, os.path.join(images, "val", "cat"))  # one class folder: it would look empty
    one_line(r"cannot read .*val.cat \(Permission denied\)", load_dataset, "image_folder", images, train=False)


@pytest.mark.parametrize("dataset", ["cifar10", "fashion_mnist", "image_folder"])
def test_data_path_through_a_file(tmp_path, dataset):
    (tmp_path / "notes.txt").write_text("x")
    one_line(r"notes.txt is a file, not a folder", load_dataset, dataset, str(tmp_path / "notes.txt" / "data"),
             train=True)


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def offline(root, train, download):  # what torchvision does before the network fails
        os.makedirs(root, exist_ok=True)
        open(os.path.join(root, "cifar-10-python.tar.gz"), "wb").write(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    typo = tmp_path / "dta" / "cifar"
    refused(capsys, "main_pretrain", *smoke_args(str(typo), tmp_path / "out"),
            match=r"CIFAR-10 not found at .*URLError.*dta.cifar did not exist \(a typo\?\)")
    assert not (tmp_path / "dta").exists()  # no empty folders left
    keep = tmp_path / "data"  # an existing folder: only what the attempt wrote goes
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    one_line("URLError", load_dataset, "cifar10", str(keep), train=True)
    assert os.listdir(keep) == ["mine.txt"]


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 1-epoch smoke pretraining checkpoint on CIFAR-format data (3 channels) and its folder."""
    root = tmp_path_factory.mktemp("bad_ckpt")
    write_fake_cifar10(str(root / "data"), per_batch=32, test_size=64)
    run_main("main_pretrain", *smoke_args(str(root / "data"), root / "pre", "--epochs", "1",
                                          "--warmup_epochs", "0"))
    return str(root / "data"), str(root / "pre" / "checkpoint-last.pth")


def _weights_only(pretrained, tmp_path):
    data, ckpt = pretrained
    sd = torch.load(ckpt, weights_only=True)["model"]
    wrapped, bare = tmp_path / "export.pth", tmp_path / "bare.pth"
    torch.save({"model": sd}, wrapped)
    torch.save(sd, bare)
    return data, sd, wrapped, bare


@pytest.mark.parametrize("script,flag", [("main_pretrain", "--resume"), ("main_finetune", "--resume"),
                                         ("main_finetune", "--finetune"), ("main_linprobe", "--finetune")])
def test_weights_only_exports(pretrained, tmp_path, capsys, script, flag):
    data, sd, wrapped, bare = _weights_only(pretrained, tmp_path)
    refused(capsys, script, *smoke_args(data, tmp_path / "o1", flag, wrapped),
            match=rf"export.pth: not a checkpoint of this project \(no [^)]*'kind'[^)]*\); it seems to be a dict with "
                  rf"keys 'model'; 'model' is a state_dict of {len(sd)} tensors \(weights only\?\)")
    refused(capsys, script, *smoke_args(data, tmp_path / "o2", flag, bare),
            match=rf"bare.pth: not a checkpoint of this project \(no 'model'[^)]*'kind'[^)]*\); it seems to be "
                  rf"a bare state_dict of {len(sd)} tensors \(weights only\?\)")


def test_require_names_what_is_missing(pretrained, tmp_path):
    ckpt = torch.load(pretrained[1], weights_only=True)
    del ckpt["optimizer"], ckpt["config"]
    path = tmp_path / "stripped.pth"
    torch.save(ckpt, path)
    assert load_checkpoint(str(path), kind="pretrain")["kind"] == "pretrain"  # default: as before
    one_line(r"stripped.pth: this pretrain checkpoint has no 'optimizer', 'config' \(a weights-only export\? "
             r"it holds .*model.*\); resuming needs the full checkpoint", load_checkpoint, str(path),
             kind="pretrain", require=("model", "optimizer", "config", "epoch"))
    one_line(r"has no 'config' \(", load_checkpoint, str(path), kind="pretrain", require=("model", "config"))
    one_line("a pretrain checkpoint, expected a finetune checkpoint", load_checkpoint, str(path),
             kind="finetune", require=("model", "optimizer"))


# The scripts reach these entries with ckpt[...] today; they pass once their callers hand
# load_checkpoint the `require` they read (see util/checkpoint.load_checkpoint).
@pytest.mark.parametrize("script,flag,drop", [("main_pretrain", "--resume", "optimizer"),
                                              ("main_finetune", "--finetune", "config")])
def test_stripped_checkpoint_end_to_end(pretrained, tmp_path, capsys, script, flag, drop):
    data, path = pretrained
    ckpt = torch.load(path, weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, tmp_path / "stripped.pth")
    refused(capsys, script, *smoke_args(data, tmp_path / "o", flag, tmp_path / "stripped.pth"),
            match=f"stripped.pth: this pretrain checkpoint has no '{drop}'")


@pytest.mark.parametrize("script,flag", [("main_pretrain", "--resume"), ("main_finetune", "--finetune"),
                                         ("main_linprobe", "--resume")])
def test_random_bytes_checkpoint_never_advises_unsafe_loading(cifar_root, tmp_path, capsys, script, flag):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = refused(capsys, script, *smoke_args(cifar_root, tmp_path / "o", flag, path),
                  match=rf"{path}: not a readable checkpoint \(not a torch.save file: neither a zip archive "
                        rf"nor a pickle\)")
    assert "weights_only" not in err


class Foreign:  # a class a foreign checkpoint may hold: safe loading refuses it
    pass


@pytest.mark.parametrize("write,message", [
    (lambda p: torch.save({"model": Foreign()}, p),
     r"it holds objects other than tensors .*Foreign\), which are not loaded"),
    (lambda p: pickle.dump({"model": 1}, open(p, "wb")), r"a Python pickle, not a torch.save file"),
    (lambda p: np.save(open(p, "wb"), np.zeros(3)), r"a NumPy .npy file"),
    (lambda p: open(p, "wb").write((14).to_bytes(8, "little") + b'{"a": {}}     '), r"a safetensors file"),
    (lambda p: open(p, "wb").close(), r"an empty file"),
    (lambda p: torch.save([torch.zeros(2)], p), None),
])
def test_foreign_checkpoint_files(tmp_path, write, message):
    path = str(tmp_path / "x.pth")
    write(path)
    if message is None:  # loads, but is no checkpoint: says what it is
        one_line(r"x.pth: not a checkpoint of this project \(no 'model', 'kind'\); it seems to be a list",
                 load_checkpoint, path)
        return
    err = one_line(rf"x.pth: not a readable checkpoint \({message}", load_checkpoint, path)
    assert "weights_only" not in err
    one_line(r"is a folder; pass a checkpoint file", load_checkpoint, str(tmp_path))


# ---- channels: a Fashion-MNIST encoder on CIFAR ------------------------------------------------

@pytest.fixture(scope="module")
def fashion_pretrained(tmp_path_factory):
    """A 1-epoch smoke pretraining checkpoint on Fashion-MNIST (1 channel), and CIFAR-format data."""
    root = tmp_path_factory.mktemp("fashion_ckpt")
    fm = _fashion(root, n_train=64, n_test=16)
    run_main("main_pretrain", *smoke_args(fm, root / "pre", "--dataset", "fashion_mnist", "--epochs", "1",
                                          "--warmup_epochs", "0"))
    write_fake_cifar10(str(root / "c10"), per_batch=16, test_size=16)
    return str(root / "pre" / "checkpoint-last.pth"), str(root / "c10")


@pytest.mark.parametrize("script", ["main_finetune", "main_linprobe"])
def test_one_channel_checkpoint_in_a_three_channel_run(fashion_pretrained, tmp_path, capsys, script):
    ckpt, cifar = fashion_pretrained
    err = refused(capsys, script, *smoke_args(cifar, tmp_path / "o", "--finetune", ckpt),
                  match=r"pretrained on 1-channel images.*, but this run's data has 3 channels; "
                        r"use the same --dataset as the pretraining")
    assert "--model" not in err


def test_one_channel_checkpoint_resumed_by_three_channel_pretraining(fashion_pretrained, tmp_path, capsys):
    ckpt, cifar = fashion_pretrained
    # --dataset given: a resume otherwise continues the checkpoint's own dataset (util.rundir)
    err = refused(capsys, "main_pretrain", *smoke_args(cifar, tmp_path / "o", "--resume", ckpt, "--dataset", "cifar10"),
                  match=r"pretrained on 1-channel images \(fashion_mnist\), but this run's data has 3 channels")
    assert "--model" not in err


def test_channel_check_names_the_dataset_and_other_mismatches_keep_model_advice():
    model = models_vit.create_model("vit_smoke_patch4", in_chans=3)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, :1]
    one_line(r"ck.pth: pretrained on 1-channel images \(fashion_mnist\), but this run's data has 3 channels",
             models_vit.load_pretrained_encoder, model, state, "ck.pth", pretrained_on="fashion_mnist")
    one_line(r"this run's data has 1 channel;", models_vit.check_input_channels,
             {"encoder.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, 1, "ck.pth",
             key="encoder.patch_embed.proj.weight")
    wide = models_vit.create_model("vit_tiny_patch4", in_chans=3)
    one_line(r"architecture mismatch.*--model", models_vit.load_pretrained_encoder, wide,
             {k: v for k, v in model.state_dict().items()}, "ck.pth")
    one_line(r"its 'model' holds no pretrained encoder", models_vit.pretrained_encoder_state,
             {"model": {"blocks.0.w": torch.zeros(1)}}, "model", "ck.pth")


# ---- kNN --------------------------------------------------------------------------------------

def test_knn_tiny_temperature_does_not_overflow():
    """Per test point: 15 same-class neighbours at similarity ~0.999 and 5 of the other class at
    ~0.99, so the right class wins at any temperature. exp(sim / 1e-3) used to overflow to inf in
    both classes, and argmax then picked class 0 for every class-1 point."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=1)
    train, train_y = [], []
    for b in base:
        noise = torch.nn.functional.normalize(torch.randn(20, 32, generator=g), dim=1)
        train += [b + 0.045 * noise[:15], b + 0.14 * noise[15:]]
        train_y += [torch.ones(15, dtype=torch.long), torch.zeros(5, dtype=torch.long)]
    train, train_y = torch.cat(train), torch.cat(train_y)
    test, test_y = base, torch.ones(8, dtype=torch.long)
    for t in (0.07, 1e-2, 1e-3, 1e-5):
        assert knn_accuracy(train, train_y, test, test_y, 2, k=20, t=t) == 100.0, t
