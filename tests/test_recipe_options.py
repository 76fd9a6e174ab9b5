"""Issue 17's recipe options, each a choice an independent loop of the same method made
differently: --wd_norm_bias, --norm_mean/--norm_std, --crop_interpolation bilinear_uint8,
--feature_head_init torch; the target health signal (effective rank); the ablation plan."""
import json

import numpy as np
import pytest
import torch
import yaml

import reproduce
from config import SECTIONS, PretrainConfig, parse_config
from conftest import ROOT, run_main, smoke_args
from dataio.augment import Augment
from dataio.in_memory import crop_resize
from engine_pretrain import build_optimizer
from models_mae import create_model
from target_encoder import token_health
from util.errors import UserError


def _decay_of(cfg):
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_wd_norm_bias_decays_every_parameter():
    default = _decay_of(PretrainConfig(weight_decay=0.05, lr=1e-3))
    # official MAE: matrices only; LayerNorm gains, biases and the tokens are not decayed
    for name in ("encoder.cls_token", "mask_token", "encoder.norm.weight", "decoder_pred.bias"):
        assert default[name] == 0.0, name
    assert default["encoder.blocks.0.attn.qkv.weight"] == 0.05
    everything = _decay_of(PretrainConfig(weight_decay=0.05, lr=1e-3, wd_norm_bias=True))
    assert set(everything) == set(default) and set(everything.values()) == {0.05}


def test_norm_stats_flags_and_their_errors(tmp_path):
    cfg = parse_config(PretrainConfig, "pretrain", ["--norm_std", "0.2023, 0.1994,0.2010"])
    from dataio.datasets import CIFAR10_MEAN, normalization
    assert normalization(cfg) == (CIFAR10_MEAN, (0.2023, 0.1994, 0.2010))
    for flags, msg in ((["--norm_std", "0,1,1"], "values must be finite and > 0"),
                       (["--norm_mean", "0.5"], r"3 channel\(s\), got 1 values"),
                       (["--norm_std", "a,b,c"], "expected 3 comma-separated numbers"),
                       (["--dataset", "fashion_mnist", "--norm_std", "0.3,0.3,0.3"], r"1 channel\(s\), got 3")):
        with pytest.raises(UserError, match=msg):
            parse_config(PretrainConfig, "pretrain", flags)


def test_report_defaults_std_and_feature_head_init():
    """The report's code: CIFAR-10 std (0.2023, 0.1994, 0.2010) and a feature head with PyTorch's
    own nn.Linear init; official MAE's (the data's std, xavier) stay options."""
    from dataio.datasets import CIFAR10_DATA_STD, FASHION_STD, normalization
    cfg = parse_config(PretrainConfig, "pretrain", [])
    assert normalization(cfg)[1] == (0.2023, 0.1994, 0.2010) and cfg.feature_head_init == "torch"
    assert CIFAR10_DATA_STD == (0.2470, 0.2435, 0.2616)
    data = parse_config(PretrainConfig, "pretrain", ["--norm_std", "0.2470,0.2435,0.2616",
                                                     "--feature_head_init", "xavier"])
    assert normalization(data)[1] == CIFAR10_DATA_STD and data.feature_head_init == "xavier"
    fashion = parse_config(PretrainConfig, "pretrain", ["--dataset", "fashion_mnist"])
    assert normalization(fashion)[1] == FASHION_STD == (0.3530,)  # true statistics: no report precedent
    cfg.resolve()  # the saved config holds the values, so a later default cannot change a run's meaning
    assert (cfg.norm_mean, cfg.norm_std) == ("0.4914,0.4822,0.4465", "0.2023,0.1994,0.201")


def test_a_run_from_before_the_std_default_is_evaluated_with_its_own_std(cifar_root, tmp_path, capsys):
    """A checkpoint whose config left norm_std empty ran with the data's std (the default then):
    the probe inherits that, not today's default."""
    from util.checkpoint import RECORDED_SINCE
    from dataio.datasets import CIFAR10_DATA_STD, stats_text
    assert RECORDED_SINCE["cifar10", "norm_std"] == stats_text(CIFAR10_DATA_STD)
    pre, probe = tmp_path / "pre", tmp_path / "probe"
    run_main("main_pretrain", *smoke_args(cifar_root, pre, "--epochs", "1", "--warmup_epochs", "0"))
    ckpt = torch.load(pre / "checkpoint-last.pth", weights_only=False)
    assert ckpt["config"]["norm_std"] == "0.2023,0.1994,0.201"  # recorded, not ""
    ckpt["config"]["norm_mean"] = ckpt["config"]["norm_std"] = ""  # as the older code wrote it
    torch.save(ckpt, pre / "old.pth")
    capsys.readouterr()
    run_main("main_linprobe", *smoke_args(cifar_root, probe, "--finetune", pre / "old.pth",
                                          "--epochs", "1", "--warmup_epochs", "0", "--cached_features"))
    assert "norm_std 0.247,0.2435,0.2616 (from the pretraining run)" in capsys.readouterr().out
    with open(probe / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert (saved["norm_mean"], saved["norm_std"]) == ("0.4914,0.4822,0.4465", "0.247,0.2435,0.2616")


def test_probe_inherits_the_pretraining_normalisation(cifar_root, tmp_path, capsys):
    pre, probe = tmp_path / "pre", tmp_path / "probe"
    run_main("main_pretrain", *smoke_args(cifar_root, pre, "--epochs", "1", "--warmup_epochs", "0",
                                          "--norm_std", "0.2,0.25,0.3"))
    run_main("main_linprobe", *smoke_args(cifar_root, probe, "--finetune", pre / "checkpoint-last.pth",
                                          "--epochs", "1", "--warmup_epochs", "0", "--cached_features"))
    assert "norm_std 0.2,0.25,0.3 (from the pretraining run)" in capsys.readouterr().out
    with open(probe / "config.yaml") as f:
        assert yaml.safe_load(f)["norm_std"] == "0.2,0.25,0.3"


def test_bilinear_uint8_crop_rounds_to_uint8_values():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    boxes = (torch.tensor([0, 3, 5, 1]), torch.tensor([2, 0, 7, 4]), torch.tensor([20, 17, 13, 25]),
             torch.tensor([19, 23, 15, 26]))
    zero, one = torch.zeros(3), torch.ones(3)
    raw = {mode: crop_resize(imgs, boxes, None, (32, 32), zero, one, mode) * 255
           for mode in ("bilinear", "bilinear_uint8")}
    rounded = raw["bilinear_uint8"]
    assert torch.allclose(rounded, rounded.round(), atol=1e-4) and rounded.min() >= 0 and rounded.max() <= 255
    assert not torch.allclose(raw["bilinear"], raw["bilinear"].round(), atol=1e-4)  # float resample
    assert (raw["bilinear"] - rounded).abs().max() <= 0.5 + 1e-4  # the same kernel, then rounded
    # the torchvision (PIL) pipeline: bilinear on the uint8 image
    pipe = Augment(interpolation="bilinear_uint8").torchvision(32, (0.5,) * 3, (0.5,) * 3)
    assert pipe.transforms[0].interpolation.value == "bilinear"


def test_feature_head_init_option():
    torch.manual_seed(0)
    xavier = create_model("mae_vit_smoke_patch4", feature_head_init="xavier")
    torch.manual_seed(0)
    plain = create_model("mae_vit_smoke_patch4")  # the default: the report's nn.Linear init
    assert torch.count_nonzero(xavier.decoder_pred_feat.bias) == 0
    assert torch.count_nonzero(plain.decoder_pred_feat.bias) > 0  # nn.Linear's uniform bias
    fan_in = plain.decoder_pred_feat.in_features
    assert plain.decoder_pred_feat.weight.abs().max() <= 1 / fan_in ** 0.5  # kaiming_uniform(a=sqrt 5)
    # every other weight is initialised as before
    for (n, a), (_, b) in zip(xavier.named_parameters(), plain.named_parameters()):
        if not n.startswith("decoder_pred_feat"):
            assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="feature_head_init"):
        create_model("mae_vit_smoke_patch4", feature_head_init="zeros")


def test_token_health_effective_rank():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(64, 16, 32, generator=g)
    assert token_health(iso)["target_erank"] > 0.9 * 32
    line = torch.randn(64, 16, 1, generator=g) * torch.randn(1, 1, 32, generator=g)  # rank 1
    assert token_health(line)["target_erank"] == pytest.approx(1.0, abs=0.05)
    dead = iso.clone()
    dead[..., 3] = 1.5
    assert token_health(dead)["target_min_channel_std"] == 0.0
    assert token_health(iso.bfloat16())["target_erank"] > 0.9 * 32


@pytest.mark.slow
def test_pretraining_logs_the_options_and_the_health_signal(cifar_root, tmp_path):
    out = tmp_path / "run"
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "ema", "--wse", "1", "--wd_norm_bias",
                                          "--crop_interpolation", "bilinear_uint8", "--feature_head_init", "torch"))
    with open(out / "log.txt") as f:
        log = [json.loads(line) for line in f]
    assert [r["regress"] for r in log] == ["pixel", "feature"]
    for r in log:
        assert 1.0 < r["target_erank"] and r["target_min_channel_std"] > 0
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert (saved["wd_norm_bias"], saved["crop_interpolation"], saved["feature_head_init"]) == (
        True, "bilinear_uint8", "torch")


def test_ablation_plan_commands_parse(tmp_path, monkeypatch):
    import contextlib
    import io
    import shlex
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(["--dry_run", "--plan", "ablation", "--data_path", str(tmp_path)]) == 0
    cmds = [shlex.split(line) for line in buf.getvalue().splitlines()]
    names = reproduce.PLANS["ablation"]
    assert len(cmds) == 2 * len(names) and {"pixel", "ema", "ema_indep"} <= set(names)
    monkeypatch.chdir(ROOT)
    pretrain = {c[c.index("--config") + 1].split("/")[-1][:-5]: parse_config(SECTIONS["pretrain"], "pretrain", c[2:])
                for c in cmds if c[1] == "main_pretrain.py"}
    base, indep = pretrain["ema"], pretrain["ema_indep"]
    assert (base.wd_norm_bias, base.norm_std, base.crop_interpolation, base.feature_head_init) == (
        False, "", "bicubic", "xavier")
    assert (indep.wd_norm_bias, indep.norm_std, indep.crop_interpolation, indep.feature_head_init) == (
        True, "0.2891", "bilinear_uint8", "torch")
    # each single-factor row differs from ema in exactly one field
    differ = lambda a, b: {k for k, v in a.to_dict().items() if v != getattr(b, k) and k not in ("config", "output_dir")}  # noqa: E731
    for row in ("ema_wd_all", "ema_std", "ema_crop_u8", "ema_head_torch"):
        assert len(differ(pretrain[row], base)) == 1, row
    assert np.isclose(float(indep.norm_std), 0.3530 * 0.2023 / 0.2470, atol=1e-4)
