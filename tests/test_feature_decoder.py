"""--feature_decoder separate (BootMAE): the feature head reads a decoder of its own."""
import json

import pytest
import torch

from conftest import run_main, smoke_args
from models_mae import create_model


def test_separate_decoder_feeds_only_the_feature_head():
    torch.manual_seed(0)
    shared = create_model("mae_vit_smoke_patch4")
    torch.manual_seed(0)
    separate = create_model("mae_vit_smoke_patch4", feature_decoder="separate")
    extra = {k for k in separate.state_dict()} - {k for k in shared.state_dict()}
    assert extra and all(k.startswith("feature_decoder.") for k in extra)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    preds, _ = separate(imgs, 0.75, ("pixel", "feature"), noise)
    pixel_loss = preds["pixel"].square().mean()
    pixel_loss.backward()  # the pixel head's loss reaches the shared decoder, not the feature one
    assert all(p.grad is None for p in separate.feature_decoder.parameters())
    assert separate.decoder_blocks[0].mlp.fc1.weight.grad is not None
    separate.zero_grad(set_to_none=True)
    preds, _ = separate(imgs, 0.75, ("feature",), noise)
    preds["feature"].square().mean().backward()
    assert all(p.grad is None for p in separate.decoder_blocks.parameters())
    assert separate.feature_decoder.blocks[0].mlp.fc1.weight.grad is not None
    # the shared layout is unchanged: same pixel prediction for the same weights and noise
    separate.load_state_dict({**separate.state_dict(), **shared.state_dict()})
    assert torch.allclose(shared(imgs, 0.75, ("pixel",), noise)[0]["pixel"],
                          separate(imgs, 0.75, ("pixel",), noise)[0]["pixel"])
    with pytest.raises(ValueError, match="feature_decoder"):
        create_model("mae_vit_smoke_patch4", feature_decoder="twin")


@pytest.mark.slow
def test_pretraining_with_a_separate_feature_decoder(cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "ema", "--wse", "1",
                                          "--feature_decoder", "separate", "--pixel_weight", "1"))
    with open(tmp_path / "log.txt") as f:
        log = [json.loads(line) for line in f]
    assert [r["regress"] for r in log] == ["pixel", "feature"] and all(r["loss"] > 0 for r in log)
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert any(k.startswith("feature_decoder.") for k in ckpt["model"])
