"""End-to-end pretraining on a generated CIFAR-format dataset (smoke config, CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import target_encoder
from conftest import ROOT, SMOKE, run_main, smoke_args


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pixel", "mae_k", "ema"])
def test_smoke_run_per_target(cifar_root, tmp_path, target):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", target))
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(r["target"] == target and r["loss"] > 0 for r in log)
    expect = ["pixel", "pixel"] if target == "pixel" else ["pixel", "feature"]
    assert [r["regress"] for r in log] == expect
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert {"model", "target", "optimizer", "epoch", "step", "config", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (160 // 32)
    assert (ckpt["target"] is None) == (target == "pixel")
    assert ckpt["config"]["target"] == target
    assert os.path.isfile(tmp_path / "checkpoint-2.pth")
    with open(tmp_path / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["target"] == target and saved["lr"] == pytest.approx(0.01 * 32 / 256)
    assert os.listdir(tmp_path / "tensorboard")


@pytest.mark.slow
@pytest.mark.parametrize("target,extra", [("ema", ["--wse", "1", "--tau", "0.9"]),
                                          ("mae_k", ["--k", "2"])])
def test_resume_is_exact(cifar_root, tmp_path, target, extra):
    """2 epochs + resume + 2 epochs == 4 straight epochs (online and target weights)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main("main_pretrain", *smoke_args(cifar_root, straight, "--target", target,
                                          "--epochs", "4", *extra))
    run_main("main_pretrain", *smoke_args(cifar_root, resumed, "--target", target,
                                          "--epochs", "4", *extra,
                                          "--resume", straight / "checkpoint-2.pth"))
    a = torch.load(straight / "checkpoint-last.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint-last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key in ("model", "target"):
        assert a[key] is not None
        for name, t in a[key].items():
            assert torch.allclose(t, b[key][name], atol=1e-6), (key, name)
    assert [r["epoch"] for r in read_log(resumed)] == [2, 3]
    # the target encoder really is different from the online one (it is being used)
    online = {k[len("encoder."):]: v for k, v in a["model"].items() if k.startswith("encoder.")}
    assert any(not torch.equal(online[k], v) for k, v in a["target"].items())


@pytest.mark.slow
def test_rerun_same_command_resumes_from_output_dir(cifar_root, tmp_path):
    args = smoke_args(cifar_root, tmp_path, "--target", "ema", "--epochs", "3")
    run_main("main_pretrain", *args[:-2], "--epochs", "2")
    run_main("main_pretrain", *args)
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_target_sees_the_same_augmented_tensor(cifar_root, tmp_path, monkeypatch):
    seen = {"model": [], "target": []}
    import models_mae
    orig_fwd = models_mae.MaskedAutoencoderViT.forward
    orig_tgt = target_encoder.Target.feature_target

    def fwd(self, imgs, *a, **k):
        seen["model"].append(imgs)
        return orig_fwd(self, imgs, *a, **k)

    def tgt(self, imgs):
        seen["target"].append(imgs)
        return orig_tgt(self, imgs)

    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "forward", fwd)
    monkeypatch.setattr(target_encoder.Target, "feature_target", tgt)
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "ema", "--wse", "1"))
    steps = 160 // 32
    assert len(seen["target"]) == steps  # epoch 1 only
    for m, t in zip(seen["model"][steps:], seen["target"]):
        assert m is t


def test_cli_overrides_config_file(cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "1", "--mask_ratio", "0.5"))
    with open(tmp_path / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["epochs"] == 1 and saved["mask_ratio"] == 0.5 and saved["model"] == "mae_vit_smoke_patch4"


BAD = [
    (["--k", "0"], "k must be >= 1"),
    (["--tau", "1.0"], "tau must be in [0, 1)"),
    (["--tau", "-0.1"], "tau must be in [0, 1)"),
    (["--target", "ema", "--wse", "-1"], "wse must be"),
    (["--target", "ema", "--wse", "2"], "wse must be in [0, epochs=2)"),
    (["--mask_ratio", "1.0"], "mask_ratio must be in (0, 1)"),
    (["--mask_ratio", "0"], "mask_ratio must be in (0, 1)"),
    (["--target", "sift"], "invalid choice: 'sift'"),
    (["--model", "mae_vit_huge"], "unknown model 'mae_vit_huge'"),
    (["--batch_size", "0"], "batch_size must be >= 1"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--blr", "-1"], "blr must be > 0"),
    (["--tau", "abc"], "invalid float value"),
    (["--skip_nonfinite", "-1"], "skip_nonfinite must be >= 0"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2(cifar_root, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "o", *args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # rejected before any work


def test_config_unknown_key_and_wrong_type(cifar_root, tmp_path, capsys):
    for text, message in [("epochs: 2\nbogus: 1\n", "unknown key 'bogus'"),
                          ("epochs: two\n", "epochs must be int"),
                          ("pretrain:\n  tau: [1]\n", "tau must be float"),
                          ("pretrain:\n  bogus2: 3\n", "unknown key(s) in section 'pretrain': bogus2")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(SystemExit) as e:
            run_main("main_pretrain", "--config", path, "--data_path", cifar_root)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_missing_data_subprocess_one_line_no_traceback(tmp_path):
    """A real process: no traceback, one line naming the path, exit 2."""
    missing = tmp_path / "nowhere" / "cifar"
    # --data_path is a file: refused before any download is attempted
    bogus = tmp_path / "file.bin"
    bogus.write_bytes(b"x")
    for path, message in [(bogus, "is a file")]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "main_pretrain.py"), "--config", SMOKE,
                            "--data_path", str(path), "--output_dir", str(tmp_path / "o")],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and str(path) in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_missing_dataset_without_download(tmp_path, capsys, monkeypatch):
    """When the download fails, one line names the path and says how to fix it."""
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", "--config", SMOKE, "--data_path", tmp_path / "none",
                 "--output_dir", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and str(tmp_path / "none") in err and "--data_path" in err
    assert len(err.splitlines()) == 1


def test_corrupt_dataset_file(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", "--config", SMOKE, "--data_path", tmp_path, "--output_dir", tmp_path / "o")
    assert e.value.code == 2 and "not a readable CIFAR-10 batch" in capsys.readouterr().err
