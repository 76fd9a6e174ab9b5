"""The fast paths change speed, not results: in-memory loader vs torchvision; the precision flag."""
import json

import pytest

from conftest import run_main, smoke_args


def losses(out):
    with open(out / "log.txt") as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_in_memory_and_torchvision_pretrain_alike(cifar_root, tmp_path):
    runs = {}
    for loader in ("in_memory", "torchvision"):
        out = tmp_path / loader
        run_main("main_pretrain", *smoke_args(cifar_root, out, "--data_loader", loader, "--epochs", "5",
                                              "--norm_pix_loss"))
        runs[loader] = losses(out)
    for curve in runs.values():
        assert curve[-1] < 0.9 * curve[0]  # both learn
    a, b = runs["in_memory"], runs["torchvision"]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=0.15)  # and the same way, epoch by epoch


def test_precision_flag_is_honoured_on_cpu_and_recorded(cifar_root, tmp_path, capsys):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0",
                                          "--precision", "bf16"))
    assert "precision: bf16" in capsys.readouterr().out
    assert "precision: bf16" in (tmp_path / "config.yaml").read_text()
    assert len(losses(tmp_path)) == 1


def test_finetune_rejects_in_memory_loader(cifar_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("main_finetune", *smoke_args(cifar_root, tmp_path, "--from_scratch", "--data_loader", "in_memory"))
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
