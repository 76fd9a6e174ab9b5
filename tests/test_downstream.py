"""Fine-tuning, linear probing and kNN on a generated CIFAR-format dataset (smoke config)."""
import json
import os
import shutil

import pytest
import torch

import models_vit
from conftest import run_main, smoke_args
from engine_finetune import finetune_optimizer as ft_optimizer
from engine_eval import knn_accuracy


@pytest.fixture(scope="module")
def pretrain_ckpt(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_ema")
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "ema", "--wse", "1", "--tau", "0.5"))
    return str(out / "checkpoint-last.pth")


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def log_lines(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_finetune_end_to_end(cifar_root, tmp_path, pretrain_ckpt):
    run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--finetune", pretrain_ckpt))
    r = results(tmp_path)
    assert r["kind"] == "finetune" and r["init"] == pretrain_ckpt and 0 <= r["last_acc1"] <= r["best_acc1"]
    log = log_lines(tmp_path)
    assert [x["epoch"] for x in log] == [0, 1]
    assert {"train_loss", "test_acc1", "test_acc5", "best_acc1"} <= set(log[0])
    # the encoder started from the pretrained weights: block 0 moved only a little
    pre = torch.load(pretrain_ckpt, weights_only=True)["model"]["encoder.blocks.0.attn.qkv.weight"]
    ft = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"]["blocks.0.attn.qkv.weight"]
    assert (ft - pre).abs().max() < 0.05 * pre.abs().max()


@pytest.mark.slow
def test_finetune_resume_continues_own_run(cifar_root, tmp_path, pretrain_ckpt):
    args = smoke_args(cifar_root, tmp_path, "--finetune", pretrain_ckpt)
    run_main("main_finetune", *args, "--epochs", "1", "--warmup_epochs", "0")
    run_main("main_finetune", *args, "--epochs", "2", "--warmup_epochs", "0")
    assert [x["epoch"] for x in log_lines(tmp_path)] == [0, 1]


def test_resume_of_pretraining_checkpoint_becomes_init(cifar_root, tmp_path, pretrain_ckpt, capsys):
    run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--resume", pretrain_ckpt, "--epochs", "1",
                                          "--warmup_epochs", "0"))
    assert "is a pretraining checkpoint: initialising from it" in capsys.readouterr().out
    assert results(tmp_path)["init"] == pretrain_ckpt


def test_from_scratch(cifar_root, tmp_path):
    run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--from_scratch", "--epochs", "1",
                                          "--warmup_epochs", "0"))
    assert results(tmp_path)["init"] is None


def test_probe_keeps_encoder_frozen_and_in_eval_mode(cifar_root, tmp_path, pretrain_ckpt, monkeypatch):
    modes = []
    orig = models_vit.LinearProbe.features

    def spy(self, x):
        modes.append(self.encoder.training)
        return orig(self, x)

    monkeypatch.setattr(models_vit.LinearProbe, "features", spy)
    run_main("main_linprobe", *smoke_args(cifar_root, tmp_path, "--finetune", pretrain_ckpt))
    assert modes and not any(modes)
    probe = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"]
    pre = torch.load(pretrain_ckpt, weights_only=True)["model"]
    enc = {k[len("encoder."):]: v for k, v in probe.items() if k.startswith("encoder.")}
    assert len(enc) > 10
    for k, v in enc.items():
        assert torch.equal(v, pre["encoder." + k]), k
    assert results(tmp_path)["kind"] == "linprobe"


def test_checkpoint_key_target_loads_target_weights(cifar_root, tmp_path, pretrain_ckpt):
    run_main("main_linprobe", *smoke_args(cifar_root, tmp_path, "--finetune", pretrain_ckpt,
                                          "--checkpoint_key", "target", "--epochs", "1", "--warmup_epochs", "0"))
    ckpt = torch.load(pretrain_ckpt, weights_only=True)
    probe = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"]
    name = "blocks.1.mlp.fc1.weight"
    assert torch.equal(probe["encoder." + name], ckpt["target"][name])
    assert not torch.equal(ckpt["target"][name], ckpt["model"]["encoder." + name])


def test_architecture_mismatch_is_clear_error(cifar_root, tmp_path, pretrain_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--finetune", pretrain_ckpt,
                                              "--model", "vit_tiny_patch4"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "architecture mismatch" in err and len(err.splitlines()) == 1


def test_foreign_weights_shape_mismatch(tmp_path, pretrain_ckpt):
    from util.errors import UserError
    state = models_vit.pretrained_encoder_state(torch.load(pretrain_ckpt, weights_only=True), "model", "x")
    with pytest.raises(UserError, match="architecture mismatch"):
        models_vit.load_pretrained_encoder(models_vit.create_model("vit_tiny_patch4"), state, "x")


def test_no_checkpoint_anywhere_says_what_to_pass(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_main("main_linprobe", "--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                           "smoke.yaml"), "--data_path", cifar_root)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--finetune" in err and "--from_scratch" in err


def test_newest_pretraining_run_is_found(cifar_root, tmp_path, pretrain_ckpt, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("output/pretrain_ema")
    shutil.copy(pretrain_ckpt, "output/pretrain_ema/checkpoint-last.pth")
    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
    run_main("main_linprobe", "--config", smoke, "--data_path", cifar_root, "--epochs", "1",
             "--warmup_epochs", "0", "--cached_features")
    assert "using the newest pretraining checkpoint: output/pretrain_ema/checkpoint-last.pth" in capsys.readouterr().out
    assert results("output/linprobe_pretrain_ema")["init"].endswith("pretrain_ema/checkpoint-last.pth")


def test_cached_probe_matches_uncached(cifar_root, tmp_path, pretrain_ckpt):
    """Without augmentation, both paths see the same features in the same order."""
    common = ("--finetune", pretrain_ckpt, "--no-aug", "--epochs", "3", "--warmup_epochs", "1")
    run_main("main_linprobe", *smoke_args(cifar_root, tmp_path / "a", *common))
    run_main("main_linprobe", *smoke_args(cifar_root, tmp_path / "b", *common, "--cached_features"))
    a, b = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert [x["test_acc1"] for x in a] == pytest.approx([x["test_acc1"] for x in b], abs=1.6)
    assert a[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], rel=1e-3)


def test_knn_separable_toy_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 10
    train_y = torch.arange(5).repeat(20)
    test_y = torch.arange(5).repeat(4)
    train = centers[train_y] + torch.randn(100, 16, generator=g) * 0.1
    test = centers[test_y] + torch.randn(20, 16, generator=g) * 0.1
    assert knn_accuracy(train, train_y, test, test_y, 5) == 100.0
    assert knn_accuracy(train, train_y, test, (test_y + 1) % 5, 5) == 0.0


@pytest.mark.slow
def test_knn_monitor_logged_during_pretraining(cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--knn_every", "1"))
    log = log_lines(tmp_path)
    assert all(0 <= x["knn_acc"] <= 100 for x in log)


def test_layer_decay_lowest_for_patch_embed_highest_for_head():
    class Cfg:
        weight_decay, layer_decay, lr = 0.05, 0.75, 1e-3
    model = models_vit.create_model("vit_smoke_patch4", global_pool=True)
    opt = ft_optimizer(model, Cfg)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    pe, head = scale[id(model.patch_embed.proj.weight)], scale[id(model.head.weight)]
    b0, b3 = scale[id(model.blocks[0].mlp.fc1.weight)], scale[id(model.blocks[3].mlp.fc1.weight)]
    assert pe == min(scale.values()) and head == max(scale.values()) == 1.0
    assert pe < b0 < b3 < head and pe == pytest.approx(0.75 ** 5)


def test_randaugment_survives_max_magnitude_posterize():
    """rand-m9-mstd0.5 reaches magnitude 10 = 0-bit posterize, which Pillow 13 rejects."""
    import numpy as np
    from PIL import Image
    from dataio.augment import finetune_transform

    class Cfg:
        aa, reprob, remode = "rand-n3-m10-inc1", 0.25, "pixel"
    t = finetune_transform(Cfg, 32, (0.5,) * 3, (0.25,) * 3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    outs = [t(img) for _ in range(200)]
    assert all(o.shape == (3, 32, 32) and torch.isfinite(o).all() for o in outs)
