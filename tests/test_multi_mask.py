"""--num_masks M (data2vec 2.0's multi-mask): M masked views of each image share ONE target pass."""
import json

import pytest
import torch

from config import PretrainConfig
from conftest import run_main, smoke_args
from models_mae import create_model
from target_encoder import FEATURE_HEAD, PIXEL_HEAD, build_target, per_mask


def test_per_mask_repeats_targets_in_the_models_batch_order():
    t = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)  # image i's target is all i
    mask = torch.zeros(6, 2)
    out = per_mask(t, mask)
    assert out.shape == (6, 2, 4) and out[:, 0, 0].tolist() == [0, 1, 2, 0, 1, 2]  # row m*N + i
    assert per_mask(t, torch.zeros(3, 2)) is t


@pytest.mark.parametrize("kind", ["pixel", "ema"])
def test_two_masks_are_the_mean_of_two_single_mask_losses_with_one_target_pass(kind):
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    target = build_target(PretrainConfig(target=kind, wse=0, epochs=2, warmup_epochs=0))
    target.on_epoch_start(0, model.encoder)  # ema: the teacher is created at epoch wse = 0
    heads = target.heads(0)
    assert heads == ((FEATURE_HEAD,) if kind == "ema" else (PIXEL_HEAD,))
    calls = []
    feature_target = target.feature_target
    target.feature_target = lambda x, *a: calls.append(len(x)) or feature_target(x, *a)
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(2, 4, model.encoder.num_patches)
    preds, mask = model(imgs.repeat(2, 1, 1, 1), 0.75, heads, noise.flatten(0, 1))
    both, _ = target.loss(model, imgs, preds, mask, 0)
    singles = [target.loss(model, imgs, *model(imgs, 0.75, heads, noise[m]), 0)[0] for m in range(2)]
    # every view removes the same number of patches per image, so the pooled mean is the average
    assert torch.allclose(both, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    assert calls == ([4, 4, 4] if kind == "ema" else [])  # one teacher pass per loss, not per view


@pytest.mark.slow
def test_pretraining_with_two_masks(cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "ema", "--wse", "1", "--num_masks", "2"))
    with open(tmp_path / "log.txt") as f:
        log = [json.loads(line) for line in f]
    assert [r["regress"] for r in log] == ["pixel", "feature"]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in log)  # finite, learning signal
