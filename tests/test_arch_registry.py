"""One table of architecture numbers (models_arch.ARCHS) builds the MAE models and the
classifiers; any input side the patch divides; pretrained encoders load at another size."""
import pytest
import timm
import torch

import models_mae
import models_vit
from conftest import run_main, smoke_args
from models_arch import ARCHS, Arch
from util.errors import UserError


def _meta(build, *args, **kwargs):
    """Build without allocating weights (the large models stay cheap)."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def _shape(vit) -> tuple:
    """(patch, width, depth, heads, mlp hidden) of a timm-style ViT encoder."""
    blk = vit.blocks[0]
    return (vit.patch_embed.patch_size[0], vit.embed_dim, len(vit.blocks), blk.attn.num_heads,
            blk.mlp.fc1.out_features)


def test_registry_names_and_the_issue_sizes():
    assert set(ARCHS) >= {"vit_tiny_patch4", "vit_smoke_patch4", "vit_smoke_patch16", "vit_tiny_patch16",
                          "vit_small_patch16", "vit_base_patch16", "vit_large_patch16"}
    for name in ARCHS:
        assert "mae_" + name in models_mae.MODELS and name in models_vit.MODELS
        assert models_vit.encoder_name_for("mae_" + name) == name
    assert list(models_mae.MODELS) == ["mae_" + n for n in ARCHS] and list(models_vit.MODELS) == list(ARCHS)
    assert "mae_vit_tiny_patch4" not in models_vit.MODELS and "vit_tiny_patch4" not in models_mae.MODELS
    # MAE's decoder for the ImageNet sizes; the report's DeiT-Tiny p4 keeps its 512 x 8 decoder
    for name in ("vit_tiny_patch4", "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16"):
        a = ARCHS[name]
        assert (a.decoder_embed_dim, a.decoder_depth, a.decoder_num_heads, a.mlp_ratio) == (512, 8, 16, 4.0)
    assert ARCHS["vit_tiny_patch4"].encoder_kwargs() == dict(patch_size=4, embed_dim=192, depth=12, num_heads=3,
                                                             mlp_ratio=4.0)


@pytest.mark.parametrize("name", list(ARCHS))
def test_mae_encoder_and_classifier_are_the_same_network(name):
    """Same numbers, and the MAE encoder's state_dict is exactly the classifier's minus its head."""
    mae = _meta(models_mae.create_model, "mae_" + name, img_size=64)
    vit = _meta(models_vit.create_model, name, img_size=64, num_classes=0)
    a = ARCHS[name]
    assert _shape(mae.encoder) == _shape(vit) == (a.patch_size, a.embed_dim, a.depth, a.num_heads,
                                                  int(a.embed_dim * a.mlp_ratio))
    assert (mae.decoder_embed.out_features, len(mae.decoder_blocks), mae.decoder_blocks[0].attn.num_heads) == \
        (a.decoder_embed_dim, a.decoder_depth, a.decoder_num_heads)
    enc = {k: v.shape for k, v in mae.encoder.state_dict().items()}
    assert enc == {k: v.shape for k, v in vit.state_dict().items()}


@pytest.mark.parametrize("name", [n for n, a in ARCHS.items() if a.timm_name])
def test_timm_registered_names_have_our_numbers(name):
    ours = _meta(models_vit.create_model, name, img_size=224, num_classes=0)
    theirs = _meta(timm.create_model, ARCHS[name].timm_name, num_classes=0)
    assert _shape(ours) == _shape(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_a_new_size_is_one_entry(monkeypatch, cifar_root, tmp_path):
    """An entry added to ARCHS (at run time, even) is a --model for pretraining and its encoder."""
    monkeypatch.setitem(ARCHS, "vit_unit_patch8", Arch(8, 32, 2, 2, decoder_embed_dim=32, decoder_depth=1,
                                                       decoder_num_heads=2))
    vit = models_vit.create_model("vit_unit_patch8", num_classes=0)
    assert _shape(vit) == (8, 32, 2, 2, 128) and vit.pos_embed.shape == (1, 1 + 16, 32)
    out = tmp_path / "run"
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--model", "mae_vit_unit_patch8", "--epochs", "1",
                                          "--warmup_epochs", "0", "--target", "pixel"))
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    state = models_vit.pretrained_encoder_state(ckpt, "model", "ck")
    models_vit.load_pretrained_encoder(vit, state, "ck")
    assert torch.equal(vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_model_builds_at_any_multiple_of_its_patch(name):
    a = ARCHS[name]
    for grid in (1, 3, 14):  # 14: ImageNet's 224 at patch 16
        n = grid * a.patch_size
        mae = _meta(models_mae.create_model, "mae_" + name, img_size=n)
        vit = _meta(models_vit.create_model, name, img_size=n)
        assert mae.encoder.pos_embed.shape == vit.pos_embed.shape == (1, 1 + grid * grid, a.embed_dim)
        assert mae.decoder_pos_embed.shape == (1, 1 + grid * grid, a.decoder_embed_dim)
    assert models_mae.num_patches("mae_" + name, 5 * a.patch_size) == 25
    for bad in (a.patch_size + 1, a.patch_size // 2, 0):
        with pytest.raises(UserError, match=f"input size {bad} is not a positive multiple of the patch size"):
            models_mae.create_model("mae_" + name, img_size=bad)
        with pytest.raises(UserError, match="not a positive multiple"):
            models_vit.create_model(name, img_size=bad)


def _pretrained_state(img_size: int) -> dict:
    """Encoder weights of a smoke p16 MAE pretrained at img_size (randomised cls token)."""
    torch.manual_seed(0)
    mae = models_mae.create_model("mae_vit_smoke_patch16", img_size=img_size)
    torch.nn.init.normal_(mae.encoder.cls_token, std=1.0)
    return models_vit.pretrained_encoder_state({"model": mae.state_dict()}, "model", "ck.pth")


@pytest.mark.parametrize("src,dst", [(64, 32), (32, 64), (64, 96)])
def test_pos_embed_interpolated_when_loading_at_another_size(src, dst, capsys):
    state = _pretrained_state(src)
    before = state["pos_embed"].clone()
    vit = models_vit.create_model("vit_smoke_patch16", img_size=dst, num_classes=0)
    models_vit.load_pretrained_encoder(vit, state, "ck.pth")
    g, h = src // 16, dst // 16
    assert f"position embeddings interpolated from {g}x{g} to {h}x{h} patches" in capsys.readouterr().out
    assert torch.equal(state["pos_embed"], before)  # the caller's weights are untouched
    assert vit.pos_embed.shape == (1, 1 + h * h, 64)
    assert torch.equal(vit.pos_embed[:, :1], before[:, :1])  # the cls slot is carried over
    expected = timm.layers.resample_abs_pos_embed(before, new_size=[h, h], num_prefix_tokens=1)
    assert torch.allclose(vit.pos_embed, expected)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    out = vit.eval().forward_features(torch.randn(2, 3, dst, dst))
    assert out.shape == (2, 1 + h * h, 64) and torch.isfinite(out).all()


def test_same_size_load_is_exact(capsys):
    state = _pretrained_state(64)
    vit = models_vit.create_model("vit_smoke_patch16", img_size=64, num_classes=0).eval()
    models_vit.load_pretrained_encoder(vit, state, "ck.pth")
    assert "interpolated" not in capsys.readouterr().out
    own = vit.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    enc = models_mae.MAEEncoder(img_size=64, **ARCHS["vit_smoke_patch16"].encoder_kwargs()).eval()
    enc.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), enc.forward_features(x), atol=1e-6)


def test_a_grid_that_does_not_fit_is_still_an_architecture_mismatch():
    state = _pretrained_state(64)
    state["pos_embed"] = state["pos_embed"][:, :-1]  # 1 + 15 tokens: no square grid
    vit = models_vit.create_model("vit_smoke_patch16", img_size=32, num_classes=0)
    with pytest.raises(UserError, match="architecture mismatch, pos_embed"):
        models_vit.load_pretrained_encoder(vit, state, "ck.pth")
