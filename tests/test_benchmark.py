"""benchmarks/throughput.py runs end to end on CPU and reports every row it promises."""
import importlib.util
import json
import os

from conftest import ROOT


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "benchmarks", "throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_smoke_writes_every_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    load_benchmark().main(["--device", "cpu", "--model", "mae_vit_smoke_patch4", "--batch_size", "16",
                           "--steps", "2", "--warmup", "1", "--images", "512", "--workers", "0", "--json", str(out)])
    rows = json.loads(out.read_text())
    found = {(r["bench"], r["variant"]) for r in rows}
    expected = {("data", "in_memory"), ("data", "torchvision_w0"), ("data", "torchvision_finetune_w0"),
                ("finetune", "precomputed"), ("features", "eval_no_grad")}
    expected |= {(f"pretrain_{t}", v) for t in ("pixel", "mae_k", "ema") for v in ("fast", "baseline")}
    assert expected <= found
    for r in rows:
        assert r["images_per_s"] > 0
        assert r["device"].startswith("cpu") and r["batch_size"] == 16 and r["dtype"] == "fp32"
    for r in rows:
        if r["variant"] == "fast" or r["bench"] == "data" and r["variant"] != "in_memory":
            assert r["ratio"] > 0
    assert "s per 50k-image epoch" in capsys.readouterr().out
