"""timm-ready weights: export_weights writes the encoders as safetensors in timm ViT key names,
and the timm.create_model call it prints gives the project's features to 1e-5."""
import os
import re

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import models_vit
from conftest import run_main, smoke_args
from util.export import FILES, export_encoders
from models_arch import ARCHS
from models_mae import MAEEncoder, create_model
from util.errors import UserError


def _timm_from(path: str, **extra) -> torch.nn.Module:
    """The model the file's own recorded timm call builds (the exact line users copy), plus extra kwargs."""
    with safe_open(path, "pt") as f:
        call = f.metadata()["timm_call"]
    for k, v in extra.items():  # the documented options for other poolings / sizes, in the same call
        call = re.sub(rf", {k}=[^,]+", "", call)[:-1] + f", {k}={v!r})"
    return eval(call, {"timm": timm}).eval()


def _project_encoder(model_name: str, state: dict, img_size: int, in_chans: int) -> MAEEncoder:
    enc = MAEEncoder(img_size=img_size, in_chans=in_chans, **ARCHS[model_name[4:]].encoder_kwargs())
    enc.load_state_dict(state)
    return enc.eval()


def _assert_same_features(path: str, state: dict, model_name: str, img_size: int, in_chans: int = 3,
                          variants: bool = True):
    """timm (as exported) vs the project's MAEEncoder and its models_vit classifier, 1e-5;
    variants: also the documented mean-patch pooling and dynamic_img_size."""
    x = torch.randn(3, in_chans, img_size, img_size)
    ours = _project_encoder(model_name, state, img_size, in_chans)
    theirs = _timm_from(path)
    # timm loads non-strictly when num_classes differs: check no key was dropped or left out
    assert set(load_file(path)) == set(theirs.state_dict())
    vit = models_vit.create_model(model_name[4:], num_classes=0, img_size=img_size, in_chans=in_chans).eval()
    models_vit.load_pretrained_encoder(vit, state, path)
    with torch.no_grad():
        tokens = ours.forward_features(x)                                    # (N, 1 + L, D)
        assert torch.allclose(theirs.forward_features(x), tokens, atol=1e-5)
        assert torch.allclose(theirs(x), models_vit.pool_tokens(tokens, "cls"), atol=1e-5)
        assert torch.allclose(vit.forward_features(x), tokens, atol=1e-5)
        if not variants:
            return
        avg = _timm_from(path, global_pool="avg", fc_norm=False)
        assert torch.allclose(avg(x), models_vit.pool_tokens(tokens, "avg"), atol=1e-5)
        dynamic = _timm_from(path, dynamic_img_size=True)
        assert torch.allclose(dynamic.forward_features(x), tokens, atol=1e-5)


@pytest.fixture(scope="module", params=["pixel", "ema"])
def pretrained(request, cifar_root, tmp_path_factory):
    """A smoke pretraining run (ema switches to features inside it, at epoch 1)."""
    out = tmp_path_factory.mktemp(request.param)
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", request.param))
    return request.param, os.path.join(out, "checkpoint-last.pth")


@pytest.mark.slow
def test_pretraining_run_exports_and_loads_in_timm(pretrained, tmp_path, capsys):
    target, ckpt_path = pretrained
    run_main("export_weights", ckpt_path, "--out", tmp_path)
    printed = capsys.readouterr().out
    ckpt = torch.load(ckpt_path, weights_only=True)
    expected = {"encoder.safetensors"} | ({"target_encoder.safetensors"} if target == "ema" else set())
    assert set(os.listdir(tmp_path)) == expected
    online = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    sources = {"encoder.safetensors": online, "target_encoder.safetensors": ckpt["target"]}
    for name in expected:
        path = str(tmp_path / name)
        assert f"wrote {path}" in printed and "timm.create_model('vit_tiny_patch16_224'" in printed
        saved = load_file(path)
        assert saved.keys() == sources[name].keys() and "head.weight" not in saved
        assert all(torch.equal(saved[k], v) for k, v in sources[name].items())
        _assert_same_features(path, sources[name], "mae_vit_smoke_patch4", 32, variants=name == "encoder.safetensors")
    if target == "ema":  # the target is not the online encoder: the test would see a mix-up
        assert not torch.equal(online["blocks.0.attn.qkv.weight"], ckpt["target"]["blocks.0.attn.qkv.weight"])


def _fake_checkpoint(path: str, model_name: str, img_size: int, in_chans: int, teachers: bool = True) -> dict:
    """A pretraining checkpoint as export reads it: random encoders for model and, with
    teachers, target and target_slow (a dual run). Returns {file export writes: its state}."""
    states = []
    for seed in range(3 if teachers else 1):
        torch.manual_seed(seed)
        enc = MAEEncoder(img_size=img_size, in_chans=in_chans, **ARCHS[model_name[4:]].encoder_kwargs())
        torch.nn.init.normal_(enc.cls_token)
        torch.nn.init.normal_(enc.norm.weight)
        states.append(enc.state_dict())
    dataset = "fashion_mnist" if in_chans == 1 else "cifar10"
    ckpt = {"kind": "pretrain", "epoch": 3, "config": {"model": model_name, "dataset": dataset},
            "model": {"encoder." + k: v for k, v in states[0].items()}, "target": None}
    if teachers:
        ckpt.update(target=states[1], target_slow=states[2])
    torch.save(ckpt, path)
    return dict(zip(FILES.values(), states))


@pytest.mark.parametrize("model_name,img_size,in_chans", [("mae_vit_tiny_patch16", 64, 3),
                                                         ("mae_vit_smoke_patch4", 32, 1)])
def test_every_encoder_of_a_checkpoint_round_trips(tmp_path, model_name, img_size, in_chans):
    """A registered timm name (no architecture kwargs; the online encoder only, to stay cheap) and
    keyword architecture on 1 channel with the dual target's two teachers; the metadata says
    how the weights were trained."""
    teachers = model_name == "mae_vit_smoke_patch4"
    states = _fake_checkpoint(str(tmp_path / "ck.pth"), model_name, img_size, in_chans, teachers)
    written = export_encoders(str(tmp_path / "ck.pth"), str(tmp_path / "out"))
    assert sorted(map(os.path.basename, written)) == sorted(states)
    for path, call in written.items():
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["timm_call"] == call and meta["img_size"] == str(img_size) and meta["in_chans"] == str(in_chans)
        assert meta["model"] == model_name and meta["epochs_trained"] == "3"
        # the mean the encoder was fed: the dataset's own
        assert meta["norm_mean"] == ("[0.286]" if in_chans == 1 else "[0.4914, 0.4822, 0.4465]")
        if not teachers:
            assert call.startswith("timm.create_model('vit_tiny_patch16_224', pretrained=True, num_classes=0, "
                                   "img_size=64, pretrained_cfg_overlay=")
        name = os.path.basename(path)
        _assert_same_features(path, states[name], model_name, img_size, in_chans,
                              variants=teachers and name == "encoder.safetensors")


def test_timm_and_the_project_resample_alike_at_another_size(tmp_path):
    """Loaded at 96 instead of 64, timm's loader and models_vit.load_pretrained_encoder give the
    same position embeddings and features."""
    states = _fake_checkpoint(str(tmp_path / "ck.pth"), "mae_vit_smoke_patch16", 64, 3, teachers=False)
    path = [p for p in export_encoders(str(tmp_path / "ck.pth")) if p.endswith("/encoder.safetensors")][0]
    theirs = _timm_from(path, img_size=96)
    vit = models_vit.create_model("vit_smoke_patch16", num_classes=0, img_size=96).eval()
    models_vit.load_pretrained_encoder(vit, states["encoder.safetensors"], path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert theirs.pos_embed.shape == (1, 1 + 36, 64)
        assert torch.allclose(theirs.pos_embed, vit.pos_embed, atol=1e-6)
        assert torch.allclose(theirs.forward_features(x), vit.forward_features(x), atol=1e-5)


def test_bad_input_is_one_line(tmp_path, capsys):
    ft = tmp_path / "ft.pth"
    torch.save({"kind": "finetune", "model": {}, "config": {"model": "vit_smoke_patch4"}}, ft)
    odd = tmp_path / "odd.pth"
    torch.save({"kind": "pretrain", "model": {"encoder." + k: v for k, v in
                                              create_model("mae_vit_smoke_patch4").encoder.state_dict().items()},
                "config": {"model": "mae_vit_nonesuch"}}, odd)
    headless = tmp_path / "headless.pth"  # a target encoder without the tensors its input size is read from
    torch.save({**torch.load(odd, weights_only=True), "config": {"model": "mae_vit_smoke_patch4"},
                "target": {"cls_token": torch.zeros(1, 1, 64)}}, headless)
    for path, why in ((ft, "a finetune checkpoint, expected a pretrain checkpoint"),
                      (odd, "unknown model 'mae_vit_nonesuch'"), (tmp_path / "missing.pth", "missing.pth"),
                      (headless, "its 'target' encoder has no patch_embed.proj.weight, pos_embed: not a ViT encoder")):
        with pytest.raises(SystemExit) as e:
            run_main("export_weights", path, "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert e.value.code == 2 and why in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("pretrained", ["ema"], indirect=True)
def test_exporting_an_earlier_checkpoint_leaves_no_stale_target(pretrained, tmp_path, capsys):
    """checkpoint-1.pth of the ema run is from before its switch (no target): exported after the
    last one into the same folder, it leaves one consistent set, the later target removed."""
    last = pretrained[1]
    earlier = os.path.join(os.path.dirname(last), "checkpoint-1.pth")
    run_main("export_weights", last, "--out", tmp_path)
    metas = [_meta(tmp_path / name) for name in ("encoder.safetensors", "target_encoder.safetensors")]
    step = str(torch.load(last, weights_only=True)["step"])
    assert all((m["source"], m["epochs_trained"], m["step"]) == (last, "2", step) for m in metas)
    capsys.readouterr()
    run_main("export_weights", earlier, "--out", tmp_path)
    out = capsys.readouterr().out
    assert os.listdir(tmp_path) == ["encoder.safetensors"]
    removed = [line for line in out.splitlines() if line.startswith("removed")]
    assert removed == [f"removed {tmp_path / 'target_encoder.safetensors'}: left by an earlier export, and "
                       f"{earlier} (epoch 1) has no such encoder"]
    meta = _meta(tmp_path / "encoder.safetensors")
    ckpt = torch.load(earlier, weights_only=True)
    assert (meta["source"], meta["epochs_trained"], meta["step"]) == (earlier, "1", str(ckpt["step"]))
    online = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    assert all(torch.equal(v, online[k]) for k, v in load_file(tmp_path / "encoder.safetensors").items())


def test_a_failed_export_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """Each file is written to a temporary and renamed: a write that fails (a full disk) leaves the
    earlier export's file whole and no temporary behind, in one line."""
    _fake_checkpoint(str(tmp_path / "ck.pth"), "mae_vit_smoke_patch4", 32, 3, teachers=False)
    path = next(iter(export_encoders(str(tmp_path / "ck.pth"))))
    before = open(path, "rb").read()
    torch.save({**torch.load(tmp_path / "ck.pth", weights_only=True), "epoch": 4}, tmp_path / "ck.pth")

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match=r"^could not write .*encoder.safetensors \(No space left on device\); "
                                        r"nothing older was lost$"):
        export_encoders(str(tmp_path / "ck.pth"))
    monkeypatch.undo()
    assert open(path, "rb").read() == before and _meta(path)["epochs_trained"] == "3"
    assert sorted(os.listdir(tmp_path)) == ["ck.pth", "encoder.safetensors"]


def test_pretraining_writes_the_timm_files_at_the_end(pretrained):
    target, ckpt_path = pretrained
    files = set(os.listdir(os.path.dirname(ckpt_path)))
    assert "encoder.safetensors" in files
    assert ("target_encoder.safetensors" in files) == (target == "ema")
