"""Any input size, image folders read per step, and the in-memory size estimate (issue 15).

A generated folder of non-square PNG and JPEG images of mixed sizes (40-120 px, 3 classes)
is pretrained at --input_size 64 with the smoke p16 model, then fine-tuned and probed at 64
and at 32 (position embeddings interpolated by models_vit.load_pretrained_encoder).
"""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dataio.datasets
import util.trainer
from conftest import run_main, smoke_args
from dataio.augment import NO_AUGMENT, PRETRAIN, PROBE, finetune_transform
from dataio.datasets import ImageFiles, image_folder_files, load_split
from dataio.fake import write_fake_cifar10
from dataio.in_memory import InMemoryLoader
from dataio.loader import FileDataset, FileLoader, build_eval_loader, build_train_loader
from config import FinetuneConfig, LinprobeConfig, PretrainConfig
from test_faults import stop_during_step
from util.errors import UserError
from util.signals import StopRequest

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
P16 = ("--model", "mae_vit_smoke_patch16")
VIT_P16 = ("--model", "vit_smoke_patch16")  # smoke.yaml names the p4 encoder for fine-tuning and probing
# 24 train images, batch 8: 3 steps an epoch; no RandAugment (timm's is tested elsewhere)
COMMON = ("--dataset", "image_folder", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0")
FT = ("--aa", "", "--reprob", "0")


def write_mixed_folder(root, n_train: int = 8, n_val: int = 4, classes=("bird", "cat", "ship"), seed: int = 0):
    """ROOT/{train,val}/CLASS/NNNN.{png,jpg}: non-square images, sides 40-120 px, alternately PNG
    and JPEG, each class its own colour and stripe direction (learnable). Returns ROOT."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for j in range(n):
                h, w = rng.integers(40, 121, size=2)
                if h == w:
                    w = w + 1 if w < 120 else w - 1  # never square
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = np.sin((xx if c % 2 else yy) * 0.4 + rng.uniform(0, 6.3))[..., None]
                colour = np.array([(c * 97) % 256, (c * 53) % 256, (c * 181) % 256])
                img = np.clip(colour * 0.6 + 60 * stripes + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, name, f"{j:04d}.{'png' if j % 2 else 'jpg'}"))
    return str(root)


def central_square(img: Image.Image, short: int, side: int) -> Image.Image:
    """Shorter side to `short` (bicubic, the longer one truncated as torchvision does), then the
    central side x side, written out with PIL alone."""
    w, h = img.size
    img = img.resize((short, int(short * h / w)) if w < h else (int(short * w / h), short), Image.BICUBIC)
    left, top = round((img.size[0] - side) / 2), round((img.size[1] - side) / 2)
    return img.crop((left, top, left + side, top + side))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_mixed_folder(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module", params=["pixel", "ema"])
def pretrained(request, folder, tmp_path_factory):
    """One epoch of pretraining at 64 from image files (ema: the target from epoch 0), kNN monitor on."""
    out = tmp_path_factory.mktemp(f"pre_{request.param}")
    run_main("main_pretrain", *smoke_args(folder, out, *COMMON, *P16, "--input_size", "64", "--data_loader",
                                          "torchvision", "--target", request.param, "--wse", "0",
                                          "--knn_every", "1"))
    return out / "checkpoint-last.pth"


def test_pretrain_at_64_from_files(pretrained):
    ckpt = torch.load(pretrained, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["input_size"] == 64
    assert ckpt["model"]["encoder.pos_embed"].shape[1] == 1 + (64 // 16) ** 2
    with open(pretrained.parent / "log.txt") as f:
        record = json.loads(f.readline())
    assert record["step"] == 3 and 0 <= record["knn_acc"] <= 100  # kNN over the files' eval transform


@pytest.mark.parametrize("size", [0, 32])
@pytest.mark.parametrize("script", ["main_finetune", "main_linprobe"])
def test_finetune_and_probe_at_64_and_32(pretrained, folder, tmp_path, capsys, script, size):
    """Unset (0), --input_size is the pretraining run's 64; at 32 the 4x4 grid of position
    embeddings is interpolated to 2x2 (models_vit)."""
    extra = FT if script == "main_finetune" else ("--knn",)
    sized = ("--input_size", size) if size else ()
    run_main(script, *smoke_args(folder, tmp_path, *COMMON, *VIT_P16, *sized, "--finetune",
                                 pretrained, "--data_loader", "torchvision", *extra))
    with open(tmp_path / "results.json") as f:
        assert 0 <= json.load(f)["last_acc1"] <= 100
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    pos_embed = next(v for k, v in ckpt["model"].items() if k.endswith("pos_embed"))
    assert pos_embed.shape[1] == 1 + ((size or 64) // 16) ** 2
    out = capsys.readouterr().out
    assert ("input_size 64 (from the pretraining run)" in out) == (not size)
    assert ("position embeddings interpolated from 4x4 to 2x2 patches" in out) == (size == 32)


# ---- the per-image transforms at size N ---------------------------------------------------------

def _cfg(cls, folder, **kw):
    return cls(dataset="image_folder", data_path=folder, data_loader="torchvision", batch_size=4, num_workers=0,
               input_size=64, device="cpu", **kw)


def test_files_keep_their_size_and_every_transform_gives_n(folder):
    cfg = _cfg(PretrainConfig, folder, model="mae_vit_smoke_patch16")
    files, labels, num_classes = load_split(cfg, train=True)
    assert isinstance(files, ImageFiles) and len(files) == 24 and num_classes == 3
    assert files.paths.dtype.kind == "S"  # one bytes array, no list of str (copy-on-write in workers)
    sizes = {Image.open(files[i]).size for i in range(len(files))}
    assert len(sizes) > 10 and all(w != h and 40 <= min(w, h) for w, h in sizes)
    assert isinstance(files[2:5], ImageFiles) and len(files[2:5]) == 3
    ft_cfg = _cfg(FinetuneConfig, folder, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    for augment in (PRETRAIN, PROBE, NO_AUGMENT, finetune_transform(ft_cfg, 64, MEAN, STD)):
        loader = build_train_loader(cfg, files, labels, CPU, MEAN, STD, augment)
        assert isinstance(loader, FileLoader) and len(loader) == 6
        loader.set_epoch(0)
        x, y = next(iter(loader))
        assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_evaluation_resizes_to_n_over_0875_then_crops_the_centre(folder):
    cfg = _cfg(LinprobeConfig, folder)
    files, labels, _ = load_split(cfg, train=False)
    loader = build_eval_loader(cfg, files, labels, CPU, MEAN, STD)
    x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    assert x.shape == (12, 3, 64, 64) and y.tolist() == labels.tolist()  # every image once, in order
    # MAE's 224 -> 256 is 64 -> 73 here
    want = np.asarray(central_square(Image.open(files[5]).convert("RGB"), int(64 / 0.875), 64), np.float32) / 255
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    want = (torch.from_numpy(want).permute(2, 0, 1) - mean) / std
    assert torch.allclose(x[5], want, atol=1e-5)


def test_augmentation_depends_on_neither_workers_nor_history(folder):
    """Each image's augmentation is seeded by (seed, epoch, rank) and its position: 0 or 2
    workers, persistent over epochs or fresh at epoch 1 (a resume), give the same batches."""
    files, labels, _ = image_folder_files(folder, train=True)

    def epoch1(workers: int, fresh: bool):
        loader = FileLoader(files, labels, PRETRAIN.torchvision(32, MEAN, STD), 8, CPU, seed=3, num_workers=workers)
        if not fresh:  # persistent workers carry their RNG over from epoch 0
            loader.set_epoch(0)
            list(loader)
        loader.set_epoch(1)
        return torch.cat([x for x, _ in loader])

    a = epoch1(0, fresh=True)
    assert torch.equal(a, epoch1(2, fresh=False)) and torch.equal(a, epoch1(0, fresh=False))
    rng = torch.get_rng_state()
    epoch1(0, fresh=True)
    assert torch.equal(rng, torch.get_rng_state())  # main-process loading leaves the masks' RNG alone


def test_stop_mid_epoch_then_resume_reads_only_what_is_left(folder, tmp_path, monkeypatch, capsys):
    """Resuming at step 1 of epoch 1 skips that batch without decoding it; the weights equal an
    uninterrupted run's."""
    args = (*COMMON, *P16, "--epochs", "2", "--input_size", "64", "--data_loader", "torchvision")
    run_main("main_pretrain", *smoke_args(folder, tmp_path / "straight", *args))
    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(3 + 1 + 1))  # 3 steps an epoch
    with pytest.raises(SystemExit):
        run_main("main_pretrain", *smoke_args(folder, tmp_path / "stopped", *args))
    assert "stopped at epoch 1, step 1" in capsys.readouterr().out
    monkeypatch.setattr(util.trainer, "StopRequest", StopRequest)
    reads, real = [], FileDataset.__getitem__
    monkeypatch.setattr(FileDataset, "__getitem__", lambda self, item: reads.append(item) or real(self, item))
    run_main("main_pretrain", *smoke_args(folder, tmp_path / "stopped", *args))
    assert len(reads) == 2 * 8  # the 2 batches left of epoch 1, not the skipped one
    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "checkpoint-last.pth", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_file_mid_epoch_is_one_line_naming_it(tmp_path, workers):
    root = write_mixed_folder(tmp_path, n_train=2, n_val=1)
    bad = os.path.join(root, "train", "cat", "0001.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n not really")
    files, labels, _ = image_folder_files(root, train=True)
    loader = FileLoader(files, labels, PRETRAIN.torchvision(32, MEAN, STD), 2, CPU, num_workers=workers)
    loader.set_epoch(0)
    with pytest.raises(UserError) as e:
        list(loader)
    assert str(e.value) == f"{bad}: not a readable image (UnidentifiedImageError)"


# ---- in memory: held at input_size, refused when it would not fit ----------------------------

@pytest.mark.slow
def test_in_memory_image_folder_is_held_at_input_size(folder):
    cfg = _cfg(PretrainConfig, folder, model="mae_vit_smoke_patch16")
    cfg.data_loader = "in_memory"
    x, y, _ = load_split(cfg, train=True)
    assert x.shape == (24, 64, 64, 3) and x.dtype == np.uint8 and len(y) == 24
    want = central_square(Image.open(image_folder_files(folder, True)[0][0]).convert("RGB"), 64, 64)
    assert np.array_equal(x[0], np.asarray(want))


@pytest.mark.parametrize("free,processes,message", [
    ({"RAM": 300_000}, 1, r"^error: --data_loader in_memory would hold 36 images \(train \+ val\) of 64x64x3 = "
                          r"442.4 kB as uint8, more than half of the 300.0 kB of RAM free; pass --data_loader "
                          r"torchvision to read them from disk per step$"),
    ({"RAM": 10**9, "cuda device memory": 300_000}, 1, "of cuda device memory free"),
    ({"RAM": 1_000_000}, 4, r"as uint8 x 4 processes, more than half"),  # one copy per torchrun process
])
def test_in_memory_refused_before_reading_a_pixel(folder, tmp_path, monkeypatch, capsys, free, processes, message):
    """36 images x 64 x 64 x 3 = 442,368 bytes: more than half of 300 kB (or of 1 MB / 4)."""
    monkeypatch.setattr(dataio.datasets, "free_memory", lambda device: free)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    monkeypatch.setattr(dataio.datasets, "open_rgb", lambda path: pytest.fail("read a pixel"))
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(folder, tmp_path, *COMMON, *P16, "--input_size", "64",
                                              "--data_loader", "in_memory"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert re.search(message, err), err


def test_in_memory_fits_at_the_estimate(folder, monkeypatch):
    monkeypatch.setattr(dataio.datasets, "free_memory", lambda device: {"RAM": 2 * 36 * 64 * 64 * 3})
    cfg = _cfg(PretrainConfig, folder, model="mae_vit_smoke_patch16")
    cfg.data_loader = "in_memory"
    assert load_split(cfg, train=True)[0].shape == (24, 64, 64, 3)
    cfg.train_subset = 12  # counted as 12 train images: 24 x 64 x 64 x 3 fits half of the 36-image budget
    monkeypatch.setattr(dataio.datasets, "free_memory", lambda device: {"RAM": 2 * 24 * 64 * 64 * 3})
    dataio.datasets.check_in_memory_fits(cfg)
    monkeypatch.setattr(dataio.datasets, "free_memory", lambda device: {"RAM": 2 * 24 * 64 * 64 * 3 - 1})
    with pytest.raises(UserError, match="24 images"):
        dataio.datasets.check_in_memory_fits(cfg)


def test_free_memory_reads_this_machine():
    free = dataio.datasets.free_memory(CPU)
    assert list(free) == ["RAM"] and free["RAM"] > 0


# ---- 32x32 datasets at another input size -------------------------------------------------------

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar64")
    write_fake_cifar10(str(root), per_batch=16, test_size=16)
    return str(root)


def test_cifar_enlarged_to_input_size_on_the_fly(cifar):
    cfg = PretrainConfig(data_path=cifar, model="mae_vit_smoke_patch16", input_size=64, batch_size=8,
                         num_workers=0, device="cpu")
    x, y, _ = load_split(cfg, train=False)
    assert x.shape == (16, 32, 32, 3)  # held at 32: enlarged per batch
    mean, std = (0.5,) * 3, (0.25,) * 3
    for loader_kind, augment in (("in_memory", PRETRAIN), ("in_memory", NO_AUGMENT), ("torchvision", PRETRAIN),
                                 ("torchvision", NO_AUGMENT)):
        cfg.data_loader = loader_kind
        loader = build_train_loader(cfg, x, y, CPU, mean, std, augment)
        loader.set_epoch(0)
        assert next(iter(loader))[0].shape == (8, 3, 64, 64), (loader_kind, augment)
    batch = next(iter(build_eval_loader(cfg, x, y, CPU, mean, std)))[0]
    # the whole image, bicubic: what F.interpolate computes (enlarging: no antialiasing)
    want = F.interpolate(torch.from_numpy(x[:8]).permute(0, 3, 1, 2).float(), size=64, mode="bicubic",
                         align_corners=False).clamp(0, 255) / 255
    want = (want - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(batch, want, atol=1e-4)
    cfg.input_size = 32  # the default: the arrays as they are, exactly as before
    old = (torch.from_numpy(x[:8]).permute(0, 3, 1, 2).float() - torch.tensor(mean).view(1, 3, 1, 1) * 255) \
        / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    assert torch.equal(next(iter(build_eval_loader(cfg, x, y, CPU, mean, std)))[0], old)


def test_cifar_pretrain_and_probe_at_64(cifar, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar, tmp_path / "pre", *P16, "--input_size", "64", "--batch_size", "16",
                                          "--epochs", "1", "--warmup_epochs", "0", "--knn_every", "1"))
    run_main("main_linprobe", *smoke_args(cifar, tmp_path / "lp", *VIT_P16, "--input_size", "64", "--batch_size", "16",
                                          "--epochs", "1", "--warmup_epochs", "0",
                                          "--finetune", tmp_path / "pre" / "checkpoint-last.pth"))
    with open(tmp_path / "lp" / "results.json") as f:
        assert 0 <= json.load(f)["last_acc1"] <= 100


def test_cifar_smaller_than_32_is_refused(cifar):
    cfg = PretrainConfig(data_path=cifar, model="mae_vit_smoke_patch4", input_size=16)
    with pytest.raises(UserError, match="cifar10 images are 32x32; they can be enlarged .* not shrunk"):
        load_split(cfg, train=True)
    with pytest.raises(ValueError, match="smaller than the images"):
        InMemoryLoader(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64), 2, CPU, out_size=16)
