"""Checkpoints whose contents are unusable: weights holding NaN/Inf, and entries of the wrong type.
Every loader (resume, --finetune of both evaluations, export_weights.py) refuses them in one line,
through util.checkpoint.load_checkpoint, before writing anything."""
import os
import re
import shutil

import pytest
import torch

from conftest import run_main, smoke_args
from util.checkpoint import load_checkpoint
from util.errors import UserError

# (script, flag): every way a checkpoint reaches the code; flag None = export_weights.py's argument
LOADERS = [("main_pretrain", "--resume"), ("main_finetune", "--finetune"), ("main_linprobe", "--finetune"),
           ("export_weights", None)]


@pytest.fixture(scope="module")
def ema_run(cifar_root, tmp_path_factory):
    """A smoke ema run (switch at epoch 1): checkpoint-1.pth has no target yet, checkpoint-2.pth has."""
    out = tmp_path_factory.mktemp("ema")
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "ema"))
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["target"] is None
    assert torch.load(out / "checkpoint-2.pth", weights_only=True)["target"] is not None
    return out


def _damaged(src, dst, edit):
    """Copy checkpoint `src` to `dst` with `edit(ckpt)` applied; returns dst as a str."""
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return str(dst)


def _refused(capsys, cifar_root, script, flag, ckpt, out):
    """Run `script` on `ckpt` writing into `out`: exit 2 with one stderr line, returned."""
    args = [ckpt, "--out", out] if flag is None else smoke_args(cifar_root, out, flag, ckpt, "--epochs", 3)
    with pytest.raises(SystemExit) as e:
        run_main(script, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def _poison(entry, name, value, n):
    def edit(ckpt):
        ckpt[entry][name].view(-1)[:n] = value
    return edit


@pytest.mark.slow
@pytest.mark.parametrize("script,flag", LOADERS)
@pytest.mark.parametrize("ckpt_name,entry,name,value,n,holds", [
    ("checkpoint-last.pth", "model", "encoder.blocks.1.attn.qkv.weight", float("nan"), 12, "12 NaN"),
    # the target encoder of an ema run past its switch: what resuming and export read besides the model
    ("checkpoint-2.pth", "target", "blocks.0.norm1.weight", float("-inf"), 3, "3 Inf"),
])
def test_non_finite_weights_are_refused_before_any_work(ema_run, cifar_root, tmp_path, capsys, script, flag,
                                                        ckpt_name, entry, name, value, n, holds):
    ckpt = _damaged(ema_run / ckpt_name, tmp_path / "ckpt.pth", _poison(entry, name, value, n))
    out = tmp_path / "out"
    err = _refused(capsys, cifar_root, script, flag, ckpt, out)
    assert err == (f"error: {ckpt}: weights are not finite ({entry}: {name} holds {holds}); this checkpoint "
                   f"cannot be trained from or exported: use an earlier checkpoint-N.pth of the run")
    # nothing written: no run directory (so no results.json), no safetensors beside the checkpoint
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


def test_rerunning_a_run_whose_last_checkpoint_is_nan_changes_nothing(ema_run, cifar_root, tmp_path, capsys):
    """The usual resume: the same command on the run's own directory. Its files stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    last = str(run / "checkpoint-last.pth")
    _damaged(last, last, _poison("model", "encoder.cls_token", float("nan"), 64))
    before = {f: os.stat(run / f).st_mtime_ns for f in os.listdir(run)}
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, run, "--target", "ema", "--epochs", 3))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "model: encoder.cls_token holds 64 NaN" in err
    assert {f: os.stat(run / f).st_mtime_ns for f in os.listdir(run)} == before


def test_non_finite_optimizer_state_and_several_tensors(ema_run, tmp_path):
    """Adam's moments are checked too (a NaN there makes the weights NaN at the first step); with
    several bad tensors the first is named and the others counted."""
    def edit(ckpt):
        ckpt["optimizer"]["state"][3]["exp_avg_sq"].view(-1)[0] = float("nan")
        ckpt["target"]["norm.bias"].view(-1)[:2] = float("inf")
        ckpt["target"]["norm.weight"].view(-1)[0] = float("nan")
    path = _damaged(ema_run / "checkpoint-2.pth", tmp_path / "ckpt.pth", edit)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "(target: norm.weight holds 1 NaN; 2 more tensors too)" in str(e.value)
    opt = _damaged(ema_run / "checkpoint-2.pth", tmp_path / "opt.pth", lambda c: c["optimizer"]["state"][3]
                   ["exp_avg"].view(-1).__setitem__(slice(0, 2), float("nan")))
    with pytest.raises(UserError, match=r"\(optimizer: state\.3\.exp_avg holds 2 NaN\)"):
        load_checkpoint(opt)


def test_the_check_is_one_isfinite_pass_per_tensor(ema_run, tmp_path, monkeypatch):
    """Cheap: one torch.isfinite per floating-point tensor, finite or not (the culprit is found
    from the flags already computed, not by a second pass)."""
    real, calls = torch.isfinite, []
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.numel()) or real(t))
    ckpt = torch.load(ema_run / "checkpoint-2.pth", weights_only=True)
    n = sum(t.is_floating_point() for k in ("model", "target") for t in ckpt[k].values()) + \
        sum(t.is_floating_point() for s in ckpt["optimizer"]["state"].values() for t in s.values())
    assert load_checkpoint(str(ema_run / "checkpoint-2.pth"))["epoch"] == 2 and len(calls) == n
    calls.clear()
    bad = _damaged(ema_run / "checkpoint-2.pth", tmp_path / "bad.pth", _poison("model", "encoder.norm.bias", 1e999, 1))
    with pytest.raises(UserError, match="encoder.norm.bias holds 1 Inf"):
        load_checkpoint(bad)
    assert len(calls) == n


def test_newest_run_with_nan_weights_is_named_not_skipped(ema_run, cifar_root, tmp_path, capsys, monkeypatch):
    """With no --finetune the newest pretraining run is used: a NaN one is refused by name, rather
    than passed over for an older run without a word."""
    monkeypatch.chdir(tmp_path)
    for name in ("older", "newer"):
        os.makedirs(f"output/{name}")
        shutil.copy(ema_run / "checkpoint-last.pth", f"output/{name}/checkpoint-last.pth")
    newer = "output/newer/checkpoint-last.pth"
    _damaged(newer, newer, _poison("model", "encoder.pos_embed", float("nan"), 1))
    os.utime("output/older/checkpoint-last.pth", (1, 1))
    with pytest.raises(SystemExit) as e:
        run_main("main_finetune", *smoke_args(cifar_root, tmp_path / "ft"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(rf"^error: {newer}: weights are not finite \(model: encoder.pos_embed", err)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("script,flag", [("main_pretrain", "--resume"), ("main_finetune", "--finetune"),
                                         ("export_weights", None)])
@pytest.mark.parametrize("edit,says", [
    # each crashed with a TypeError/AttributeError/KeyError, or (config without a model) blamed the
    # checkpoint for another model than the one it holds
    (lambda c: c.__setitem__("config", "lr: 0.1"), r"its 'config' is a str, where the settings"),
    (lambda c: c.__setitem__("config", None), r"its 'config' is a NoneType, where the settings"),
    (lambda c: c["config"].pop("model"), r"its 'config' names no 'model', where the settings"),
    (lambda c: c.__setitem__("model", torch.zeros(3)), r"its 'model' is a single tensor of shape \(3,\), not a "
                                                       r"state_dict of tensors"),
    (lambda c: c.__setitem__("target", [1, 2]), r"its 'target' is a list, not a state_dict of tensors"),
    (lambda c: c.__setitem__("epoch", "2"), r"its 'epoch' is '2', not a count"),
])
def test_entries_of_the_wrong_type_are_one_line(ema_run, cifar_root, tmp_path, capsys, script, flag, edit, says):
    ckpt = _damaged(ema_run / "checkpoint-last.pth", tmp_path / "ckpt.pth", edit)
    err = _refused(capsys, cifar_root, script, flag, ckpt, tmp_path / "out")
    assert re.search(rf"^error: {ckpt}: {says}.*\(a damaged or hand-edited checkpoint\)$", err), err
    assert not (tmp_path / "out").exists()
