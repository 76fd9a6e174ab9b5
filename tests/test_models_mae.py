import pytest
import torch

from models_mae import MODELS, MAEEncoder, create_model, masked_mse, random_masking, sincos_pos_embed


def test_registry_has_report_model_with_report_shapes():
    m = create_model("mae_vit_tiny_patch4")
    enc = m.encoder
    assert enc.embed_dim == 192 and len(enc.blocks) == 12 and enc.blocks[0].attn.num_heads == 3
    assert enc.num_patches == 64 and enc.patch_embed.proj.kernel_size == (4, 4)
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16
    assert m.decoder_pred.out_features == 4 * 4 * 3 and m.decoder_pred_feat.out_features == 192
    assert not enc.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert "mae_vit_smoke_patch4" in MODELS


def test_smoke_model_is_a_few_hundred_thousand_parameters():
    n = sum(p.numel() for p in create_model("mae_vit_smoke_patch4").parameters())
    assert 1e5 < n < 1e6


def test_patchify_unpatchify_round_trip():
    m = create_model("mae_vit_smoke_patch4")
    imgs = torch.randn(3, 3, 32, 32)
    patches = m.patchify(imgs)
    assert patches.shape == (3, 64, 48)
    assert torch.equal(m.unpatchify(patches), imgs)
    # patch 1 is the 4x4 block at row 0, columns 4..7, flattened as (p, p, C)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_masking_keeps_exactly_16_of_64_per_image():
    x = torch.randn(5, 64, 8)
    kept, mask, ids_restore = random_masking(x, 0.75)
    assert kept.shape == (5, 16, 8)
    assert torch.equal(mask.sum(1), torch.full((5,), 48.0))
    # the kept tokens are exactly the ones the mask marks as kept
    for i in range(5):
        keep_idx = (mask[i] == 0).nonzero().squeeze(1)
        assert torch.equal(kept[i].sort(0).values, x[i, keep_idx].sort(0).values)


def test_forward_shapes_and_heads():
    m = create_model("mae_vit_smoke_patch4")
    preds, mask = m(torch.randn(2, 3, 32, 32), 0.75, heads=("pixel", "feature"))
    assert preds["pixel"].shape == (2, 64, 48) and preds["feature"].shape == (2, 64, 64)
    assert mask.shape == (2, 64)


def test_unmasked_features_keep_patch_order():
    """With identity blocks, token 1+i must be norm(proj(patch i) + pos_i): no shuffling."""
    enc = MAEEncoder(embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():
        for blk in enc.blocks:  # zero residual branches -> every block is the identity
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    imgs = torch.randn(2, 3, 32, 32)
    feats = enc.forward_features(imgs)
    w = enc.patch_embed.proj.weight.reshape(32, -1)
    for i in (0, 1, 9, 63):
        r, c = divmod(i, 8)
        patch = imgs[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1)
        expected = enc.norm(patch @ w.T + enc.patch_embed.proj.bias + enc.pos_embed[0, 1 + i])
        assert torch.allclose(feats[:, 1 + i], expected, atol=1e-5)


def test_masked_mse_counts_removed_patches_only():
    pred = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert masked_mse(pred, target, mask).item() == (4 + 16) / 2


@pytest.mark.parametrize("img_size", [48, 64, 96])
def test_p16_model_at_other_input_sizes(img_size):
    """Position embeddings are the sin-cos of the grid the input size gives (G = N/16), encoder
    and decoder alike; masking, decoding and both heads follow L = G*G."""
    g = img_size // 16
    m = create_model("mae_vit_smoke_patch16", img_size=img_size)
    assert torch.equal(m.encoder.pos_embed, sincos_pos_embed(g, 64))
    assert torch.equal(m.decoder_pos_embed, sincos_pos_embed(g, 64))
    imgs = torch.randn(2, 3, img_size, img_size)
    preds, mask = m(imgs, 0.75, heads=("pixel", "feature"))
    assert preds["pixel"].shape == (2, g * g, 16 * 16 * 3) and preds["feature"].shape == (2, g * g, 64)
    assert mask.shape == (2, g * g) and torch.equal(mask.sum(1), torch.full((2,), float(g * g - int(g * g * 0.25))))
    assert all(torch.isfinite(p).all() for p in preds.values())
    assert torch.equal(m.unpatchify(m.patchify(imgs)), imgs)
    assert m.encoder.forward_features(imgs).shape == (2, 1 + g * g, 64)
