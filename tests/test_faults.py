"""Runs survive signals, kills during saves, NaNs and bad input without losing finished epochs."""
import json
import math
import os
import signal

import pytest
import torch

import target_encoder
import util.trainer
from conftest import run_main, smoke_args
from util.signals import StopRequest


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {**ckpt["model"], **{"target." + k: v for k, v in (ckpt["target"] or {}).items()}}


def stop_during_step(n: int):
    """A StopRequest whose n-th poll says "stop": a signal arriving at a chosen step. With 5 steps
    an epoch, 5 + 1 + 2 = the 5 steps of epoch 0, its end-of-epoch check, then step 2 of epoch 1."""
    class StopAt(StopRequest):
        calls = 0

        def __init__(self):
            super().__init__()
            self.signal_name, self.signal_number = "SIGTERM", signal.SIGTERM

        @property
        def requested(self):
            StopAt.calls += 1
            return StopAt.calls == n

        @requested.setter
        def requested(self, value):
            pass
    return StopAt


def test_signal_sets_stop_request():
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    finally:
        stop.restore()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stop_mid_epoch_then_resume_equals_uninterrupted(precision, cifar_root, tmp_path, monkeypatch, capsys):
    """Stopped at step 2 of epoch 1 (after the switch to features) and resumed with the same
    command, the run ends where the uninterrupted one does, in fp32 and under bf16 autocast."""
    args = ("--target", "ema", "--wse", "1", "--ema_every", "step", "--tau", "0.8", "--epochs", "3",
            "--precision", precision)
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "straight", *args))

    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(5 + 1 + 2))
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as e:  # a stopped run exits 128 + signal number, as shells do
        run_main("main_pretrain", *smoke_args(cifar_root, out, *args))
    assert e.value.code == 128 + signal.SIGTERM
    assert "stopped at epoch 1, step 2" in capsys.readouterr().out
    ckpt, _ = weights(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and ckpt["epoch_step"] == 2
    monkeypatch.setattr(util.trainer, "StopRequest", StopRequest)
    run_main("main_pretrain", *smoke_args(cifar_root, out, *args))  # the same command again
    _, a = weights(tmp_path / "straight" / "checkpoint-last.pth")
    _, b = weights(out / "checkpoint-last.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(cifar_root, tmp_path, monkeypatch):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0"))
    good = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temp file...
        raise KeyboardInterrupt  # ...then the process dies

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0"))
    after = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == good["epoch"] == 1
    assert all(torch.equal(after["model"][k], v) for k, v in good["model"].items())


def nan_loss_on_calls(monkeypatch, bad_calls):
    """Make Target.loss return NaN on the chosen calls (5 steps per smoke epoch)."""
    real_loss = target_encoder.Target.loss
    calls = {"n": 0}

    def poisoned(self, *args):
        loss, stats = real_loss(self, *args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] - 1 in bad_calls else loss), stats

    monkeypatch.setattr(target_encoder.Target, "loss", poisoned)


def expect_nan_stop(cifar_root, tmp_path, *extra, says=()):
    """The run stops on a NaN loss, saying `says`, and checkpoint-last.pth is epoch 0's, finite."""
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, *extra))
    msg = str(e.value.code)
    assert all(s in msg for s in ("checkpoint-last.pth", *says)), msg
    ckpt, w = weights(tmp_path / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in w.values())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cifar_root, tmp_path, monkeypatch):
    nan_loss_on_calls(monkeypatch, set(range(5, 15)))  # epochs 1 and 2
    expect_nan_stop(cifar_root, tmp_path, "--epochs", "3",
                    says=("non-finite loss at epoch 1, step 0", "rerun with --skip_nonfinite N"))


def test_skip_nonfinite_skips_bad_steps_without_touching_weights(cifar_root, tmp_path, monkeypatch):
    nan_loss_on_calls(monkeypatch, set(range(5, 10)))  # every step of epoch 1
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--skip_nonfinite", "5"))
    e1 = torch.load(tmp_path / "checkpoint-1.pth", weights_only=True)
    e2 = torch.load(tmp_path / "checkpoint-2.pth", weights_only=True)
    assert e2["epoch"] == 2 and e2["skipped_nonfinite"] == 5
    for k, v in e1["model"].items():  # a skipped step changes nothing
        assert torch.equal(e2["model"][k], v), k
    assert e2["optimizer"]["state"][0]["step"] == e1["optimizer"]["state"][0]["step"]
    with open(tmp_path / "log.txt") as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped_steps"] for r in records] == [0, 5]
    assert math.isfinite(records[0]["loss"]) and math.isnan(records[1]["loss"])


def test_skip_nonfinite_stops_once_the_budget_is_spent(cifar_root, tmp_path, monkeypatch):
    nan_loss_on_calls(monkeypatch, {5, 6, 7})
    expect_nan_stop(cifar_root, tmp_path, "--skip_nonfinite", "2",
                    says=("non-finite loss at epoch 1, step 2", "the most --skip_nonfinite 2 allows"))


@pytest.mark.slow
def test_different_config_in_same_output_dir_is_refused(cifar_root, tmp_path, capsys):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0"))
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0",
                                              "--mask_ratio", "0.5"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "mask_ratio: 0.75 -> 0.5" in err and len(err.splitlines()) == 1
    # an explicit --resume of that run continues it with the new settings
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0",
                                          "--mask_ratio", "0.5", "--resume", tmp_path / "checkpoint-last.pth"))
    with open(tmp_path / "log.txt") as f:
        assert len(f.readlines()) == 2


def test_unwritable_output_dir_detected_at_start(cifar_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, blocker / "run"))
    assert e.value.code == 2 and "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["main_pretrain", "main_finetune", "main_linprobe"])
def test_truncated_or_foreign_checkpoint(cifar_root, tmp_path, capsys, script):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "pre", "--epochs", "1", "--warmup_epochs", "0"))
    data = (tmp_path / "pre" / "checkpoint-last.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, message in [(truncated, "not a readable checkpoint"), (foreign, "not a checkpoint of this project")]:
        with pytest.raises(SystemExit) as e:
            run_main(script, *smoke_args(cifar_root, tmp_path / "o", "--resume", path))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and str(path) in err and len(err.splitlines()) == 1


def test_checkpoint_of_another_script_is_refused(cifar_root, tmp_path, capsys):
    run_main("main_finetune", *smoke_args(cifar_root, tmp_path / "ft", "--from_scratch", "--epochs", "1",
                                          "--warmup_epochs", "0"))
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "o", "--resume", tmp_path / "ft" / "checkpoint-last.pth"))
    assert e.value.code == 2 and "a finetune checkpoint, expected a pretrain" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main("main_linprobe", *smoke_args(cifar_root, tmp_path / "o2", "--resume", tmp_path / "ft" / "checkpoint-last.pth"))
    assert e.value.code == 2 and "cannot resume linprobe" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_stop_mid_epoch_then_resume_equals_uninterrupted(cifar_root, tmp_path, monkeypatch, capsys):
    args = ("--from_scratch", "--epochs", "2", "--warmup_epochs", "1", "--aa", "", "--reprob", "0")
    run_main("main_finetune", *smoke_args(cifar_root, tmp_path / "straight", *args))

    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(5 + 1 + 2))
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as e:
        run_main("main_finetune", *smoke_args(cifar_root, out, *args))
    assert e.value.code == 128 + signal.SIGTERM
    assert "stopped at epoch 1, step 2" in capsys.readouterr().out
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch_step"] == 2
    monkeypatch.setattr(util.trainer, "StopRequest", StopRequest)
    run_main("main_finetune", *smoke_args(cifar_root, out, *args))
    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_finetune_nan_stops_without_saving(cifar_root, tmp_path, monkeypatch):
    import engine_finetune
    real = engine_finetune.evaluate
    calls = {"n": 0}

    def poison_after_first_epoch(model, loader, precision="fp32"):
        calls["n"] += 1
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))  # the next epoch's loss is NaN
        return real(model, loader, precision)

    monkeypatch.setattr(engine_finetune, "evaluate", poison_after_first_epoch)
    with pytest.raises(SystemExit) as e:
        run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--from_scratch", "--epochs", "2"))
    # weights that went NaN are never saved: the run stops at the commit point of epoch 0
    assert "the weights are not finite (model: " in str(e.value.code) and "not saved" in str(e.value.code)
    assert not (tmp_path / "checkpoint-last.pth").exists()


@pytest.mark.slow
def test_nan_loss_stops_naming_the_epoch_and_keeps_the_last_checkpoint(cifar_root, tmp_path, monkeypatch):
    import engine_finetune
    real = engine_finetune.Classification.train_step
    calls = {"n": 0}

    def poisoned(self, batch, step):  # every step of epoch 1 has a NaN loss
        calls["n"] += 1
        out = real(self, batch, step)
        return out if step.epoch == 0 or out is None else {**out, "loss": out["loss"] * float("nan")}
    monkeypatch.setattr(engine_finetune.Classification, "train_step", poisoned)
    with pytest.raises(SystemExit) as e:
        run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--from_scratch", "--epochs", "2"))
    assert "non-finite loss at epoch 1" in str(e.value.code) and "--skip_nonfinite N" in str(e.value.code)
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_rerun_after_an_option_was_added_continues(cifar_root, tmp_path, capsys):
    """A run saved before an option existed ran as its default: rerunning the command after the
    upgrade continues it; asking for another value of the new option is a different run."""
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0"))
    path = tmp_path / "checkpoint-last.pth"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["wd_norm_bias"], ckpt["config"]["feature_head_init"]  # as saved by an older version
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0",
                                              "--wd_norm_bias"))
    assert e.value.code == 2 and "wd_norm_bias: False -> True" in capsys.readouterr().err
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0"))
    with open(tmp_path / "log.txt") as f:
        assert len(f.readlines()) == 2
