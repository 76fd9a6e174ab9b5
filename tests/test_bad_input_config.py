"""Bad-input catalogue, config level: each case through a script's main(argv), in-process.

Every case must end with exit code 2, a single line on stderr that says what is wrong, and
no work done (the output directory is never created).
"""
import os

import pytest
import torch

from conftest import run_main, smoke_args

PRETRAIN, FINETUNE, LINPROBE = "main_pretrain", "main_finetune", "main_linprobe"

# (script, YAML text, message): values in a --config file get the same checks as flags.
YAML_CASES = [
    (PRETRAIN, "target: banana\n", "c.yaml: unknown target 'banana'; choose from pixel, mae_k"),
    (PRETRAIN, "pretrain:\n  target: banana\n", "c.yaml [pretrain]: unknown target 'banana'"),
    (PRETRAIN, "precision: fp16\n", "c.yaml: unknown precision 'fp16'; choose from"),
    (PRETRAIN, "data_loader: gpu_magic\n", "c.yaml: unknown data_loader 'gpu_magic'; choose from in_memory"),
    (PRETRAIN, "pretrain:\n  knn_pool: max\n", "unknown knn_pool 'max'; choose from cls, avg"),
    (LINPROBE, "linprobe:\n  pool: maxpool\n", "unknown pool 'maxpool'; choose from cls, avg"),
    (FINETUNE, "finetune:\n  checkpoint_key: ema\n", "unknown checkpoint_key 'ema'; choose from model, target"),
    (FINETUNE, "finetune:\n  aa: foo\n", "aa 'foo' is not a RandAugment policy timm accepts"),
    (FINETUNE, "finetune:\n  remode: weird\n", "unknown remode 'weird'; choose from pixel, rand, const"),
    (PRETRAIN, "epochs: 2\nseed: 1\nepochs: 3\n", "c.yaml: duplicate key 'epochs' (line 3)"),
    (PRETRAIN, "pretrain:\n  k: 2\n  tau: 0.9\n  k: 3\n", "c.yaml: duplicate key 'k' (line 4)"),
    (PRETRAIN, "blr: .inf\n", "c.yaml: blr must be a finite number, got inf"),
    (PRETRAIN, "pretrain:\n  tau: .nan\n", "c.yaml [pretrain]: tau must be a finite number, got nan"),
    (PRETRAIN, "seed: 18446744073709551616\n", "c.yaml: seed must be in [0, 4294967295]"),
    (PRETRAIN, "pretrain:\n  mask_ratio: 0.99\n", "mask_ratio 0.99 keeps none of the 64 patches"),
]

# (script, flags, message)
FLAG_CASES = [
    (FINETUNE, ["--aa", "foo"], "aa 'foo' is not a RandAugment policy timm accepts (Unknown AA policy foo)"),
    (FINETUNE, ["--aa", "rand-w0"], "aa 'rand-w0' is not a RandAugment policy"),
    (PRETRAIN, ["--seed", str(2**64)], "seed must be in [0, 4294967295], got 18446744073709551616"),
    (PRETRAIN, ["--seed", str(2**63)], "seed must be in [0, 4294967295]"),
    (PRETRAIN, ["--seed=-1"], "seed must be in [0, 4294967295], got -1"),
    (PRETRAIN, ["--mask_ratio", "0.99"], "mask_ratio 0.99 keeps none of the 64 patches of mae_vit_smoke_patch4"),
    (PRETRAIN, ["--mask_ratio", "1e-17"], "mask_ratio 1e-17 removes none of the 64 patches"),
    (PRETRAIN, ["--blr", "inf"], "blr must be a finite number, got inf"),
    (PRETRAIN, ["--lr", "inf"], "lr must be a finite number, got inf"),
    (PRETRAIN, ["--pixel_weight", "inf"], "pixel_weight must be a finite number, got inf"),
    (PRETRAIN, ["--tau", "nan"], "tau must be a finite number, got nan"),
    (PRETRAIN, ["--tau_end", "nan"], "tau_end must be a finite number, got nan"),
    (PRETRAIN, ["--min_lr", "inf"], "min_lr must be a finite number, got inf"),
    (PRETRAIN, ["--weight_decay", "inf"], "weight_decay must be a finite number, got inf"),
    (PRETRAIN, ["--slow_lambda", "inf"], "slow_lambda must be a finite number, got inf"),
    (PRETRAIN, ["--knn_t", "inf"], "knn_t must be a finite number, got inf"),
    (FINETUNE, ["--clip_grad", "inf"], "clip_grad must be a finite number, got inf"),
    (FINETUNE, ["--layer_decay", "nan"], "layer_decay must be a finite number, got nan"),
    (FINETUNE, ["--mixup", "inf"], "mixup must be a finite number, got inf"),
    (LINPROBE, ["--knn_t", "nan"], "knn_t must be a finite number, got nan"),
    (LINPROBE, ["--blr", "inf"], "blr must be a finite number, got inf"),
    (PRETRAIN, ["--device", "cuda:x"], "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
]


def _expect_one_line_exit_2(capsys, script, args, message):
    with pytest.raises(SystemExit) as e:
        run_main(script, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("script,text,message", YAML_CASES)
def test_bad_yaml_value(cifar_root, tmp_path, capsys, script, text, message):
    (tmp_path / "c.yaml").write_text(text)
    args = ["--config", tmp_path / "c.yaml", "--data_path", cifar_root, "--output_dir", tmp_path / "o",
            "--device", "cpu", "--num_workers", "0"]
    _expect_one_line_exit_2(capsys, script, args, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script,flags,message", FLAG_CASES)
def test_bad_flag_value(cifar_root, tmp_path, capsys, script, flags, message):
    _expect_one_line_exit_2(capsys, script, smoke_args(cifar_root, tmp_path / "o", *flags), message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", [PRETRAIN, FINETUNE, LINPROBE])
def test_config_file_not_utf8(cifar_root, tmp_path, capsys, script):
    (tmp_path / "c.yaml").write_bytes(b"epochs: 2\n# caf\xe9 latin-1\n")
    args = ["--config", tmp_path / "c.yaml", "--data_path", cifar_root, "--output_dir", tmp_path / "o"]
    _expect_one_line_exit_2(capsys, script, args, "c.yaml: not UTF-8 text (byte 0xe9 at offset 15)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", [PRETRAIN, FINETUNE, LINPROBE])
def test_output_dir_not_utf8(cifar_root, tmp_path, capsys, script):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")  # as Python hands it over from argv
    _expect_one_line_exit_2(capsys, script, smoke_args(cifar_root, out), "holds a byte that is not UTF-8")
    assert os.listdir(tmp_path) == []


def test_device_mps_without_mps(cifar_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # as on any non-Apple build
    _expect_one_line_exit_2(capsys, PRETRAIN, smoke_args(cifar_root, tmp_path / "o", "--device", "mps"),
                            "--device mps requested but MPS is not available")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda(cifar_root, tmp_path, capsys, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect_one_line_exit_2(capsys, FINETUNE, smoke_args(cifar_root, tmp_path / "o", "--device", device),
                            f"--device {device} requested but CUDA is not available")
    assert not (tmp_path / "o").exists()


def test_device_cuda_index_beyond_the_machine(cifar_root, tmp_path, capsys, monkeypatch):
    n = 2  # a simulated 2-GPU machine: the check runs before any CUDA call
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    _expect_one_line_exit_2(capsys, PRETRAIN, smoke_args(cifar_root, tmp_path / "o", "--device", f"cuda:{n}"),
                            f"this machine has {n} CUDA device(s)")
