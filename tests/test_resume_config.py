"""A run never trains something other than what was asked without saying so: a checkpoint's
method is continued (or a change of it said), a finished run is not silently re-run, an option
that cannot act is named, a refused start leaves nothing behind."""
import json
import os

import pytest
import yaml
import torch

import util.trainer
from conftest import SMOKE, run_main, smoke_args
from test_faults import stop_during_step
from util.signals import StopRequest


def log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def refused(capsys, *args, module="main_pretrain"):
    """Run a script expecting a refusal: returns its one error line."""
    with pytest.raises(SystemExit) as e:
        run_main(module, *args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def ema_run(cifar_root, tmp_path_factory):
    """A finished 2-epoch EMA run (tau 0.9, switch at epoch 1)."""
    out = tmp_path_factory.mktemp("ema")
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "ema", "--tau", "0.9", "--precision", "fp32"))
    return out


@pytest.mark.slow
def test_resume_into_a_new_directory_continues_the_checkpoints_method(ema_run, cifar_root, tmp_path, capsys):
    """`--resume RUN_EMA/checkpoint-last.pth --output_dir NEW`, the method's flags not repeated:
    the run continues EMA-MAE (not the defaults' pixel MAE) and says which settings it kept."""
    ckpt = ema_run / "checkpoint-last.pth"
    run_main("main_pretrain", "--data_path", cifar_root, "--resume", ckpt, "--output_dir", tmp_path, "--epochs", 3)
    out = capsys.readouterr().out
    assert f"continuing {ckpt} as it ran" in out and "target 'ema'" in out and "tau 0.9" in out
    line = next(x for x in out.splitlines() if "as it ran" in x)
    assert "print_freq" not in line and "save_freq" not in line  # adopted (below), not worth a word
    with open(tmp_path / "config.yaml") as f:
        assert yaml.safe_load(f)["print_freq"] == 2  # configs/smoke.yaml's, as the run ran
    [record] = log(tmp_path)
    assert record["epoch"] == 2 and record["target"] == "ema" and record["regress"] == "feature"
    saved = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["config"]
    assert saved["target"] == "ema" and saved["tau"] == 0.9 and saved["model"] == "mae_vit_smoke_patch4"
    assert saved["lr"] == pytest.approx(0.01 * 32 / 256)  # derived from the kept blr and batch


def test_resume_with_a_changed_setting_says_so(ema_run, cifar_root, tmp_path, capsys):
    ckpt = ema_run / "checkpoint-last.pth"
    run_main("main_pretrain", "--data_path", cifar_root, "--resume", ckpt, "--output_dir", tmp_path, "--epochs", 3,
             "--tau", "0.5")
    assert "changed settings: tau: 0.9 -> 0.5" in capsys.readouterr().out
    assert log(tmp_path)[0]["tau"] == 0.5


def test_resume_cannot_change_the_architecture(ema_run, cifar_root, tmp_path, capsys):
    err = refused(capsys, "--data_path", cifar_root, "--resume", ema_run / "checkpoint-last.pth",
                  "--output_dir", tmp_path / "new", "--epochs", 3, "--model", "mae_vit_tiny_patch4")
    assert "holds a run of model 'mae_vit_smoke_patch4'" in err and "mae_vit_tiny_patch4" in err
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_rerun_into_a_directory_with_another_method_is_refused(ema_run, cifar_root, tmp_path, capsys):
    """Rerunning into a run's own directory with a flag set to another value: another experiment."""
    out = tmp_path / "run"
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "ema", "--epochs", 2, "--warmup_epochs", 0))
    err = refused(capsys, *smoke_args(cifar_root, out, "--target", "mae_k", "--epochs", 3, "--warmup_epochs", 0))
    assert "holds a run with a different config (target: 'ema' -> 'mae_k')" in err


def test_finished_checkpoint_into_a_new_directory_is_refused_naming_its_epoch(ema_run, cifar_root, tmp_path,
                                                                                capsys):
    err = refused(capsys, "--data_path", cifar_root, "--resume", ema_run / "checkpoint-last.pth",
                  "--output_dir", tmp_path / "new")
    assert "is already at epoch 2 of --epochs 2: nothing to train" in err
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("problem", ["missing data", "batch_size", "accum_iter"])
def test_a_refused_start_leaves_nothing(problem, cifar_root, tmp_path, capsys):
    out = tmp_path / "out" / "run"
    args = {"missing data": ("--data_path", tmp_path / "nowhere"),
            "batch_size": ("--data_path", cifar_root, "--batch_size", 1000),
            "accum_iter": ("--data_path", cifar_root, "--accum_iter", 6)}[problem]
    err = refused(capsys, "--config", SMOKE, "--output_dir", out, *args)
    if problem == "accum_iter":  # 160 images / batch 32: no step would see the effective batch
        assert "accum_iter 6 is larger than the 5 batches of an epoch" in err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_options_that_cannot_act_are_named(cifar_root, tmp_path, capsys):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "pixel", "--tau", "0.9", "--stage_reset",
                                          "--epochs", 1, "--warmup_epochs", 0))
    out = capsys.readouterr().out
    assert "note: --target pixel does not read" in out and "stage_reset" in out and "tau" in out
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "ema", "--target", "ema", "--feature_ramp", 4,
                                          "--epochs", 2, "--warmup_epochs", 0))
    out = capsys.readouterr().out
    assert "feature_ramp 4 is longer than the feature phase (epochs 1-1)" in out
    assert "note: --target ema does not read k: ignored" in out  # smoke.yaml's k; tau and the ramp act


@pytest.mark.slow
def test_mid_epoch_resume_across_a_refresh_logs_it_as_the_straight_run(cifar_root, tmp_path, monkeypatch):
    """MAE-K refreshes at the start of epoch 1; stopped at step 2 of that epoch and resumed, the
    epoch's log line still says target_refreshed: true."""
    args = ("--target", "mae_k", "--k", 1, "--epochs", 3, "--precision", "fp32")
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "straight", *args))
    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(5 + 1 + 2))  # 5 steps an epoch
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        run_main("main_pretrain", *smoke_args(cifar_root, out, *args))
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch_step"] == 2
    monkeypatch.setattr(util.trainer, "StopRequest", StopRequest)
    run_main("main_pretrain", *smoke_args(cifar_root, out, *args))
    straight = [r["target_refreshed"] for r in log(tmp_path / "straight")]
    assert straight == [False, True, True]
    assert [r["target_refreshed"] for r in log(out)] == straight
