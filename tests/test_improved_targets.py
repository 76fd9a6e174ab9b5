"""Options of the improved Bootstrap-MAE (issue: report section 6), each against a hand computation."""
import math

import pytest
import torch

from config import PretrainConfig
from models_mae import create_model, masked_mse
from target_encoder import build_target, cosine_tau, pixel_target
from conftest import run_main, smoke_args


def make(kind, steps_per_epoch=1, **options):
    """The target `--target KIND` with these options builds (other options: the defaults)."""
    return build_target(PretrainConfig(target=kind, **options), steps_per_epoch)


def test_cosine_tau_schedule_values():
    assert cosine_tau(0.99, None, 0.7) == 0.99
    assert cosine_tau(0.99, 0.999, 0.0) == pytest.approx(0.99)
    assert cosine_tau(0.99, 0.999, 0.5) == pytest.approx(0.9945)
    assert cosine_tau(0.99, 0.999, 1.0) == pytest.approx(0.999)
    t = make("ema", tau=0.9, tau_end=0.99, ema_every="step", epochs=4, steps_per_epoch=10)
    assert t.tau_at(1, 10) == pytest.approx(0.99 - 0.09 * (math.cos(math.pi * 0.25) + 1) / 2)
    t.ema_every = "epoch"
    assert t.tau_at(3, 0) == pytest.approx(0.99)  # the update after the last epoch


def test_per_step_ema_uses_scheduled_tau():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    t = make("ema", wse=0, tau=0.5, tau_end=0.9, ema_every="step", epochs=1, steps_per_epoch=2)
    t.on_epoch_start(0, model.encoder)
    old = {k: v.clone() for k, v in t.encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    t.on_step_end(0, model.encoder, 1)  # progress 0.5 -> tau 0.7
    k = "blocks.0.attn.qkv.weight"
    online = model.encoder.state_dict()[k]
    assert torch.allclose(t.encoder.state_dict()[k], 0.7 * old[k] + 0.3 * online, atol=1e-6)


def _target(**kw):
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    t = make("ema", wse=0, **kw)
    t.on_epoch_start(0, model.encoder)
    return model, t


def test_layer_average_and_norms_match_hand_computation():
    imgs = torch.randn(2, 3, 32, 32)
    model, t = _target(target_layers=2)
    blocks = model.encoder.forward_blocks(imgs)
    n = model.encoder.norm
    hand = (n(blocks[-1]) + n(blocks[-2]))[:, 1:] / 2
    assert torch.allclose(t.feature_target(imgs), hand, atol=1e-5)

    model, t = _target(target_layers=2, target_prenorm=True, target_norm="layernorm")
    blocks = model.encoder.forward_blocks(imgs)
    avg = (blocks[-1] + blocks[-2])[:, 1:] / 2
    mu, var = avg.mean(-1, keepdim=True), avg.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(t.feature_target(imgs), (avg - mu) / torch.sqrt(var + 1e-5), atol=1e-4)

    model, t = _target(target_layers=1, target_prenorm=True, target_norm="instancenorm")
    last = model.encoder.forward_blocks(imgs)[-1][:, 1:]  # (N, L, D): normalise each channel over L
    mu, var = last.mean(1, keepdim=True), last.var(1, unbiased=False, keepdim=True)
    assert torch.allclose(t.feature_target(imgs), (last - mu) / torch.sqrt(var + 1e-5), atol=1e-4)

    model, t = _target()  # defaults: the report's target
    assert torch.allclose(t.feature_target(imgs), model.encoder.forward_features(imgs)[:, 1:])


def test_pixel_weight_and_feature_ramp_change_loss_as_specified():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    imgs = torch.randn(2, 3, 32, 32)
    t = make("ema", wse=1, pixel_weight=0.5, feature_ramp=4)
    t.on_epoch_start(1, model.encoder)
    assert t.heads(1) == ("feature", "pixel") and t.heads(0) == ("pixel",)
    preds, mask = model(imgs, 0.75, t.heads(1))
    feat = masked_mse(preds["feature"], model.encoder.forward_features(imgs)[:, 1:], mask)
    pix = masked_mse(preds["pixel"], pixel_target(model.patchify(imgs), False), mask)
    for epoch, ramp in [(1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        loss, _ = t.loss(model, imgs, preds, mask, epoch)
        assert torch.allclose(loss, ramp * feat + 0.5 * pix, atol=1e-6), epoch


def test_dual_uses_one_online_forward_and_both_targets():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    t = make("dual", wse=1, k=2, tau=0.5, slow_lambda=0.2)
    for e in range(3):  # snapshot refreshed at 1 and 3; EMA created at 1, updated each epoch
        t.on_epoch_start(e, model.encoder)
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(0.01)
        t.on_epoch_end(e, model.encoder)
    assert t.encoder is not None and t.slow is not None
    assert any(not torch.equal(a, b) for a, b in zip(t.encoder.state_dict().values(), t.slow.state_dict().values()))
    calls = []
    orig = model.encoder.forward_masked
    model.encoder.forward_masked = lambda *a, **k: calls.append(1) or orig(*a, **k)
    imgs = torch.randn(2, 3, 32, 32)
    preds, mask = model(imgs, 0.75, t.heads(2))
    loss, _ = t.loss(model, imgs, preds, mask, 2)
    assert len(calls) == 1  # one online forward pass
    l_ema = masked_mse(preds["feature"], t.encoder.forward_features(imgs)[:, 1:], mask)
    l_k = masked_mse(preds["feature"], t.slow.forward_features(imgs)[:, 1:], mask)
    assert torch.allclose(loss, l_ema + 0.2 * l_k, atol=1e-6)


@pytest.mark.slow
def test_dual_end_to_end_and_resume_keeps_snapshot(cifar_root, tmp_path):
    args = ("--target", "dual", "--wse", "1", "--k", "1", "--epochs", "3", "--tau_end", "0.999",
            "--ema_every", "step", "--target_layers", "2", "--target_norm", "layernorm")
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "a", *args))
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "b", *args,
                                          "--resume", tmp_path / "a" / "checkpoint-2.pth"))
    a = torch.load(tmp_path / "a" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)
    for key in ("target", "target_slow"):
        assert a[key] is not None
        for name, v in a[key].items():
            assert torch.allclose(v, b[key][name], atol=1e-6), (key, name)


@pytest.mark.parametrize("args,message", [
    (["--tau_end", "1.0"], "tau_end must be in [0, 1)"),
    (["--target_layers", "0"], "target_layers must be >= 1"),
    (["--target_layers", "9"], "exceeds the encoder depth"),
    (["--pixel_weight", "-1"], "pixel_weight must be >= 0"),
    (["--target_norm", "batchnorm"], "invalid choice"),
])
def test_improved_options_bad_values(cifar_root, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "o", *args))
    assert e.value.code == 2 and message in capsys.readouterr().err
