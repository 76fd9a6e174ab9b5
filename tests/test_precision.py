"""--precision auto|bf16|fp32 and --compile on CPU (issue 14): the fast paths train, resume and say
what they chose."""
import json
import types

import numpy as np
import pytest
import torch
import yaml

import engine_pretrain
import util.runtime
import util.trainer
from conftest import kind_options, run_main, smoke_args
from test_faults import stop_during_step
from config import PretrainConfig
from engine_finetune import Classification
from models_vit import create_model as create_classifier
from target_encoder import TARGETS
from util.nonfinite import NonFiniteGuard
from util.trainer import Step

CPU = torch.device("cpu")


def batch(n=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def steps(engine, epoch: int, n: int):
    """n steps on one fixed batch; the losses, as floats."""
    engine.begin_epoch(epoch, resumed=False)
    x, y = batch()
    return [float(engine.train_step((x, y), Step(epoch, i, i + 1, NonFiniteGuard()))["loss"]) for i in range(n)]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bf16_pretraining_step_learns_for_every_target(name, tmp_path, teacher_file):
    torch.manual_seed(0)
    cfg = PretrainConfig(model="mae_vit_smoke_patch4", target=name, batch_size=16, epochs=10, warmup_epochs=0,
                         wse=0, k=1, blr=0.05, precision="bf16", output_dir=str(tmp_path),
                         **kind_options(name, teacher_file))
    cfg.resolve()
    images = np.zeros((16, 32, 32, 3), np.uint8)
    engine = engine_pretrain.build_engine(cfg, CPU, (images, np.zeros(16, np.int64), 10), (0.5,) * 3, (0.25,) * 3, 1)
    epoch = engine.target.switch_epoch or 0
    real_loss, dtypes = engine.target.loss, set()

    def loss(model, imgs, preds, mask, ep):  # what the heads produced: bf16 under autocast
        dtypes.update(p.dtype for p in preds.values())
        return real_loss(model, imgs, preds, mask, ep)
    engine.target.loss = loss
    losses = steps(engine, epoch, 6)
    assert dtypes == {torch.bfloat16}
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert next(engine.model.parameters()).dtype == torch.float32  # weights stay fp32
    state = engine.optimizer.state_dict()["state"]
    assert all(v["exp_avg"].dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("kind", ["finetune", "linprobe"])
def test_bf16_supervised_step_learns(kind):
    torch.manual_seed(0)
    model = create_classifier("vit_smoke_patch4", num_classes=10)
    params = model.head.parameters() if kind == "linprobe" else model.parameters()
    cfg = types.SimpleNamespace(precision="bf16", clip_grad=None)
    engine = Classification(cfg, kind, model, model, torch.optim.SGD(params, lr=0.05), torch.nn.CrossEntropyLoss(),
                            test_loader=[])
    losses = steps(engine, 0, 6)
    assert losses[-1] < losses[0], losses


def test_auto_resolves_to_fp32_without_native_bf16_and_bf16_with_it(monkeypatch, capsys):
    monkeypatch.setattr(util.runtime, "fast_bf16", lambda device: False)
    assert util.runtime.resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(util.runtime, "fast_bf16", lambda device: True)
    assert util.runtime.resolve_precision("auto", CPU) == "bf16"
    assert util.runtime.resolve_precision("auto", CPU, resumed="fp32") == "fp32"  # a resumed run keeps its own
    assert util.runtime.resolve_precision("fp32", CPU) == "fp32"
    assert "precision: bf16 (auto)" in capsys.readouterr().out


@pytest.mark.slow
def test_resolved_precision_is_saved_and_kept_on_resume(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setattr(util.runtime, "fast_bf16", lambda device: True)  # as on a CPU with AVX512-BF16
    args = smoke_args(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0")
    run_main("main_pretrain", *args)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["precision"] == "bf16"
    monkeypatch.setattr(util.runtime, "fast_bf16", lambda device: False)  # the same run on another machine
    run_main("main_pretrain", *args[:-4], "--epochs", "2", "--warmup_epochs", "0")
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["precision"] == "bf16"


@pytest.mark.slow
def test_compiled_pretraining_through_the_switch_resumes_exactly(cifar_root, tmp_path, monkeypatch):
    """torch.compile on CPU (inductor, C++): the run crosses the switch epoch (new heads, new
    graphs, counted in the log) and, stopped at the boundary and resumed, equals the straight run."""
    common = ("--target", "ema", "--wse", "1", "--tau", "0.9", "--warmup_epochs", "1", "--precision", "fp32",
              "--compile")
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "straight", *common, "--epochs", "2"))
    out = tmp_path / "compiled"
    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(5 + 1))  # stop after epoch 0
    with pytest.raises(SystemExit):
        run_main("main_pretrain", *smoke_args(cifar_root, out, *common, "--epochs", "2"))
    monkeypatch.undo()
    run_main("main_pretrain", *smoke_args(cifar_root, out, *common, "--epochs", "2"))
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["regress"] for r in log] == ["pixel", "feature"]
    assert all(r["compiled_graphs"] >= 1 for r in log)
    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(out / "checkpoint-last.pth", weights_only=True)
    for key in ("model", "target"):
        for name, t in a[key].items():
            assert torch.allclose(t, b[key][name], atol=1e-6), (key, name)


def test_compile_without_a_cpp_compiler_is_one_line(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(util.runtime.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--compile"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "needs a C++ compiler" in err and len(err.splitlines()) == 1
