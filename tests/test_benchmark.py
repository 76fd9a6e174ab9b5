"""benchmarks/throughput.py runs end to end on CPU and reports every row it promises."""
import importlib.util
import json
import math
import os
from collections import Counter

import pytest
import torch

import engine_pretrain
from conftest import ROOT
from target_encoder import self_contained

pytestmark = pytest.mark.slow  # every test here runs whole scripts or processes


def load_benchmark(name: str = "throughput"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_smoke_writes_every_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    load_benchmark().main(["--device", "cpu", "--model", "mae_vit_smoke_patch4", "--batch_size", "16",
                           "--steps", "2", "--warmup", "1", "--images", "512", "--workers", "0", "--json", str(out),
                           "--precision", "fp32",  # auto is bf16 on a CPU with AVX512-BF16
                           "--bench", "data", "pretrain", "finetune", "features", "--targets", *self_contained()])
    rows = json.loads(out.read_text())
    found = {(r["bench"], r["variant"]) for r in rows}
    expected = {("data", "in_memory"), ("data", "torchvision_w0"), ("data", "torchvision_finetune_w0"),
                ("finetune", "precomputed"), ("features", "eval_no_grad")}
    expected |= {(f"pretrain_{t}", v) for t in self_contained() for v in ("fast", "baseline")}  # every kind
    assert {"pixel", "mae_k", "ema", "dual", "random", "hog"} <= set(self_contained())
    assert expected <= found
    for r in rows:
        assert r["images_per_s"] > 0
        assert r["device"].startswith("cpu") and r["batch_size"] == 16 and r["dtype"] == "fp32"
    for r in rows:
        if r["variant"] == "fast" or r["bench"] == "data" and r["variant"] != "in_memory":
            assert r["ratio"] > 0
    assert "s per 50k-image epoch" in capsys.readouterr().out


def test_precision_comparison_times_the_engine_step_for_every_target(tmp_path, capsys, monkeypatch):
    """--bench precision: fp32 eager, bf16 eager and bf16 + torch.compile, every registered target,
    each a ratio against fp32 eager of the same target, all timing Pretraining.train_step itself.
    Speed is not asserted (bf16 is emulated on a CPU without AVX512-BF16)."""
    calls = Counter()
    real_step = engine_pretrain.Pretraining.train_step

    def counted(self, batch, step):
        compiled = isinstance(self.forward, torch._dynamo.eval_frame.OptimizedModule)
        calls[self.cfg.target, self.cfg.precision, self.cfg.compile, compiled] += 1
        return real_step(self, batch, step)
    monkeypatch.setattr(engine_pretrain.Pretraining, "train_step", counted)
    out = tmp_path / "rows.json"
    rows = load_benchmark().main(["--device", "cpu", "--model", "mae_vit_smoke_patch4", "--bench", "precision",
                                  "--batch_size", "8", "--steps", "1", "--warmup", "1", "--images", "64",
                                  "--threads", "1", "--json", str(out), "--targets", *self_contained()])
    assert json.loads(out.read_text()) == rows
    variants = {"fp32_eager": ("fp32", False), "bf16_eager": ("bf16", False), "bf16_compile": ("bf16", True)}
    by = {(r["bench"], r["variant"]): r for r in rows}
    assert set(by) == {(f"precision_{t}", v) for t in self_contained() for v in variants} and len(rows) == len(by)
    for t in self_contained():
        reference = by[f"precision_{t}", "fp32_eager"]["images_per_s"]
        for v, (dtype, compiled) in variants.items():
            r = by[f"precision_{t}", v]
            assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
            assert (r["dtype"], r["compile"], r["model"]) == (dtype, compiled, "mae_vit_smoke_patch4")
            assert r["ratio"] == pytest.approx(r["images_per_s"] / reference) and r["ratio"] > 0
            assert calls[t, dtype, compiled, compiled] == 2  # warm-up + timed step, the engine's own
    assert sum(calls.values()) == 2 * len(rows)
    printed = capsys.readouterr().out
    assert "precision rows = that variant / fp32_eager of the same target" in printed
    assert "precision_pixel     bf16_compile" in printed


def test_probe_recipe_runs_each_setting(cifar_root, tmp_path, monkeypatch, capsys):
    from conftest import run_main, smoke_args
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "pre", "--epochs", "1", "--warmup_epochs", "0"))
    out = tmp_path / "rows.json"
    monkeypatch.setattr("sys.argv", ["probe_recipe.py", "--finetune", str(tmp_path / "pre" / "checkpoint-last.pth"),
                                     "--data_path", cifar_root, "--device", "cpu", "--grid", "1:0.1", "2:5",
                                     "--json", str(out), "--", "--batch_size", "32"])
    assert load_benchmark("probe_recipe").main() == 0
    rows = json.loads(out.read_text())
    assert [(r["epochs"], r["blr"]) for r in rows] == [(1, 0.1), (2, 5.0)]
    assert all(0 <= r["best_acc1"] <= 100 and 0 <= r["knn_acc"] <= 100 for r in rows)
    # the same frozen features: kNN does not depend on the probe's setting
    assert rows[0]["knn_acc"] == rows[1]["knn_acc"]
    assert "epochs    2  blr 5" in capsys.readouterr().out
