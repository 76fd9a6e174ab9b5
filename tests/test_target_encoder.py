import pytest
import torch

from config import PretrainConfig
from engine_pretrain import build_optimizer
from models_mae import create_model
from target_encoder import build_target, pixel_target


Cfg = PretrainConfig(lr=1e-3, weight_decay=0.05)  # what build_optimizer reads


def make(kind, **options):
    """The target `--target KIND` with these options builds (other options: the defaults)."""
    return build_target(PretrainConfig(target=kind, **options))


def tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def train_step(model, target, epoch, opt):
    imgs = torch.randn(4, 3, 32, 32)
    preds, mask = model(imgs, 0.75, target.heads(epoch))
    loss, _ = target.loss(model, imgs, preds, mask, epoch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    target.on_step_end(epoch, model.encoder)
    return loss


def test_pixel_target_never_builds_an_encoder():
    model = create_model("mae_vit_smoke_patch4")
    t = make("pixel")
    for e in range(5):
        t.on_epoch_start(e, model.encoder)
        t.on_epoch_end(e, model.encoder)
        assert t.heads(e) == ("pixel",) and t.encoder is None


def test_mae_k_refreshes_exactly_at_multiples_of_k():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, Cfg)
    t = make("mae_k", k=2)
    refreshes = []
    for e in range(7):
        before = None if t.encoder is None else tensors(t.encoder)
        if t.on_epoch_start(e, model.encoder):
            refreshes.append(e)
            assert same(tensors(t.encoder), tensors(model.encoder))  # exact copy
        elif before is not None:
            assert same(tensors(t.encoder), before)  # frozen in between
        assert t.heads(e) == (("feature",) if e >= 2 else ("pixel",))
        train_step(model, t, e, opt)
        t.on_epoch_end(e, model.encoder)
    assert refreshes == [2, 4, 6]


def test_target_unchanged_by_optimizer_step_and_has_no_grads():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, Cfg)
    train_step(model, make("pixel"), 0, opt)  # online has grads now
    t = make("ema", wse=0, tau=0.9)
    t.on_epoch_start(0, model.encoder)
    before = tensors(t.encoder)
    train_step(model, t, 0, opt)
    assert same(tensors(t.encoder), before)
    assert all(p.grad is None and not p.requires_grad for p in t.encoder.parameters())
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in t.encoder.parameters()}
    assert not same(tensors(model.encoder), before)  # the online encoder did move


def test_ema_update_equals_formula_per_epoch_and_per_step():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, Cfg)
    for every in ("epoch", "step"):
        t = make("ema", wse=1, tau=0.9, ema_every=every)
        t.on_epoch_start(0, model.encoder)
        assert t.encoder is None  # warm-up on pixels
        t.on_epoch_start(1, model.encoder)
        assert same(tensors(t.encoder), tensors(model.encoder))
        old_t = tensors(t.encoder)
        train_step(model, t, 1, opt)  # per step: update happens inside
        online = tensors(model.encoder)
        t.on_epoch_end(1, model.encoder)  # per epoch: update happens here
        for k, v in tensors(t.encoder).items():
            assert torch.allclose(v, 0.9 * old_t[k] + 0.1 * online[k], atol=1e-6), k


def test_feature_head_in_optimizer_and_trained_only_after_switch():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, Cfg)
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.decoder_pred_feat.weight) in opt_ids and id(model.decoder_pred.weight) in opt_ids
    t = make("ema", wse=1)
    head0 = model.decoder_pred_feat.weight.detach().clone()
    t.on_epoch_start(0, model.encoder)
    train_step(model, t, 0, opt)
    assert torch.equal(model.decoder_pred_feat.weight, head0)  # pixels only before the switch
    t.on_epoch_start(1, model.encoder)
    train_step(model, t, 1, opt)
    assert not torch.equal(model.decoder_pred_feat.weight, head0)


def test_loss_is_pixel_before_switch_and_feature_after():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    t = make("mae_k", k=1, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    t.on_epoch_start(0, model.encoder)
    preds, mask = model(imgs, 0.75, ("pixel", "feature"))
    loss0, _ = t.loss(model, imgs, preds, mask, 0)
    tgt = pixel_target(model.patchify(imgs), True)
    expect0 = (((preds["pixel"] - tgt) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss0, expect0)
    t.on_epoch_start(1, model.encoder)
    loss1, _ = t.loss(model, imgs, preds, mask, 1)
    feats = model.encoder.forward_features(imgs)[:, 1:]
    expect1 = (((preds["feature"] - feats) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss1, expect1, atol=1e-6)
    assert feats.shape == (2, 64, 64)


def test_feature_target_is_eval_mode_without_autograd():
    model = create_model("mae_vit_smoke_patch4")
    t = make("ema", wse=0)
    t.on_epoch_start(0, model.encoder)
    t.encoder.train()
    out = t.feature_target(torch.randn(2, 3, 32, 32))
    assert not t.encoder.training and not out.requires_grad and out.grad_fn is None


def test_resume_without_target_when_needed_is_an_error():
    model = create_model("mae_vit_smoke_patch4")
    t = make("ema", wse=1)
    t.load_state_dict({"target": None}, model.encoder)
    with pytest.raises(RuntimeError, match="target encoder"):
        t.on_epoch_start(3, model.encoder)


def test_norm_pix_target_is_zero_mean_unit_var_per_patch():
    x = torch.randn(2, 64, 48) * 5 + 3
    y = pixel_target(x, True)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.equal(pixel_target(x, False), x)


def test_random_teacher_is_the_initial_encoder_and_never_changes():
    """dBOT's first stage: the teacher is the online encoder as initialised, from step 0 on."""
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, Cfg)
    initial = tensors(model.encoder)
    t = make("random", epochs=3)
    assert t.on_epoch_start(0, model.encoder)  # created before any training
    assert same(tensors(t.encoder), initial)
    for e in range(3):
        if e:
            assert not t.on_epoch_start(e, model.encoder)  # never refreshed
        assert t.heads(e) == ("feature",) and t.describe(e) == {"target": "random", "regress": "feature"}
        train_step(model, t, e, opt)
        t.on_epoch_end(e, model.encoder)
        assert same(tensors(t.encoder), initial)
    assert not same(tensors(model.encoder), initial)  # while the online encoder trained


def test_random_loss_regresses_the_teacher_features_from_epoch_0():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    t = make("random")
    t.on_epoch_start(0, model.encoder)
    imgs = torch.randn(2, 3, 32, 32)
    preds, mask = model(imgs, 0.75, t.heads(0))
    loss, _ = t.loss(model, imgs, preds, mask, 0)
    feats = model.encoder.forward_features(imgs)[:, 1:]
    expect = (((preds["feature"] - feats) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, expect, atol=1e-6)


@pytest.mark.parametrize("kind,options,keys", [
    ("pixel", {}, {"target"}),
    ("mae_k", {"k": 1}, {"target"}),
    ("ema", {"wse": 0}, {"target"}),
    ("dual", {"wse": 0, "k": 1}, {"target", "target_slow"}),
    ("random", {}, {"target"}),
])
def test_checkpoint_entries_round_trip(kind, options, keys):
    """state_dict() gives the checkpoint's entries; a fresh target loaded from them (and from the
    whole checkpoint dict around them) holds the same weights and keeps its schedule."""
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, Cfg)
    t = make(kind, epochs=4, **options)
    for e in range(2):
        t.on_epoch_start(e, model.encoder)
        train_step(model, t, e, opt)
        t.on_epoch_end(e, model.encoder)
    entries = t.state_dict()
    assert set(entries) == keys
    assert (entries["target"] is None) == (kind == "pixel")
    ckpt = {"model": model.state_dict(), "epoch": 2, **entries}
    u = make(kind, epochs=4, **options)
    u.load_state_dict(ckpt, model.encoder)
    assert torch.equal(u.checksum(), t.checksum())
    for a, b in zip(t.teachers(), u.teachers()):
        assert (a is None and b is None) or same(tensors(a), tensors(b))
        assert b is None or not any(p.requires_grad for p in b.parameters())
    for e in (2, 3):  # both continue identically
        assert t.on_epoch_start(e, model.encoder) == u.on_epoch_start(e, model.encoder)
        assert torch.equal(u.checksum(), t.checksum())


def test_old_checkpoint_entries_still_load():
    """Checkpoints written before the registry: "target" always, "target_slow" (None) for every kind."""
    model = create_model("mae_vit_smoke_patch4")
    enc = model.encoder.state_dict()
    t = make("ema", wse=0)
    t.load_state_dict({"target": enc, "target_slow": None}, model.encoder)
    assert same(tensors(t.encoder), enc)
    d = make("dual", wse=0)
    d.load_state_dict({"target": enc, "target_slow": enc}, model.encoder)
    assert same(tensors(d.slow), enc)
    p = make("pixel")
    p.load_state_dict({"target": None, "target_slow": None}, model.encoder)
    assert p.encoder is None and float(p.checksum()) == 0.0
