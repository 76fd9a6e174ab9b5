"""One command for a lent GPU: is the fast path fast, and does real training run and resume?

    python benchmarks/gpu_check.py                   # on a GPU: the report's model, < 8 minutes
    python benchmarks/gpu_check.py --device cpu      # smoke scale, seconds (tests/test_gpu_check.py)

(a) Throughput of one pretraining step (forward, target pass, loss, backward, AdamW step, EMA
    update) for every registered target that needs no file (target_encoder.self_contained:
    --target teacher costs what random does for a teacher of its size), with the in-memory
    loader, at the report's config (mae_vit_tiny_patch4, batch 512) in the precision `auto`
    picks and torch.compile'd:
    seconds per 50,000-image epoch and MFU = FLOPs per step (counted by
    torch.utils.flop_counter on an eager step) / step time / the GPU's dense bf16 peak.
(b) A short real training on generated CIFAR-format data: pixel and ema (the switch epoch
    inside the run, compiled), then a rerun with one more epoch that must resume from the
    checkpoint. Fails (exit 1) if a loss is not finite, a checkpoint is missing or no resume.
"""
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine_pretrain import build_engine  # noqa: E402
from config import PretrainConfig  # noqa: E402
from dataio.augment import PRETRAIN  # noqa: E402
from dataio.datasets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from dataio.fake import make_images, write_fake_cifar10  # noqa: E402
from dataio.loader import build_train_loader  # noqa: E402
from target_encoder import EMATarget, PixelTarget, self_contained  # noqa: E402
from report_figures.flops import count_step_flops  # noqa: E402
from util.nonfinite import NonFiniteGuard  # noqa: E402
from util.runfiles import BadRunFile, read_log  # noqa: E402
from util.runtime import resolve_device, resolve_precision  # noqa: E402
from util.trainer import Step  # noqa: E402
from util.errors import ArgumentParser, cli  # noqa: E402

EPOCH_IMAGES = 50_000  # CIFAR-10's training set
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets; --peak_tflops overrides.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
SCALES = {  # (model, batch, timed steps, warm-up steps, fake images per batch file, epochs, switch)
    "gpu": dict(model="mae_vit_tiny_patch4", batch=512, steps=30, warmup=8, per_batch=1024, epochs=4, switch=2),
    "cpu": dict(model="mae_vit_smoke_patch4", batch=32, steps=3, warmup=2, per_batch=32, epochs=3, switch=1),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(name: str, scale: dict, device: torch.device, compile_: bool, out: str) -> PretrainConfig:
    """The report's recipe at this scale, with the target's switch at epoch 0 or 1 (features)."""
    cfg = PretrainConfig(model=scale["model"], target=name, batch_size=scale["batch"], epochs=10,
                         warmup_epochs=1, wse=0, k=1, device=device.type, compile=compile_,
                         output_dir=out, data_loader="in_memory")
    cfg.resolve()
    cfg.precision = resolve_precision("auto", device)
    return cfg


def bench_target(name: str, scale: dict, device: torch.device, images, labels, out: str) -> Dict[str, float]:
    """Seconds per 50k-image epoch and FLOPs per step of one target's pretraining step."""
    train_set = (images, labels, 10)
    result = {}
    for compile_ in (False, True):  # eager: count FLOPs; compiled: time
        cfg = bench_config(name, scale, device, compile_ and device.type == "cuda", out)
        loader = build_train_loader(cfg, images, labels, device, CIFAR10_MEAN, CIFAR10_STD, PRETRAIN)
        engine = build_engine(cfg, device, train_set, CIFAR10_MEAN, CIFAR10_STD, len(loader))
        epoch = engine.target.switch_epoch or 0  # the feature phase when there is one
        batches, guard, k = iter(loader), NonFiniteGuard(), 0
        if not compile_:
            result["flops_per_step"] = count_step_flops(engine, next(batches), epoch)
            continue
        engine.begin_epoch(epoch, resumed=False)

        def step():
            nonlocal k
            k += 1
            return engine.train_step(next(batches), Step(epoch, k, k, guard))
        for _ in range(scale["warmup"]):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(scale["steps"]):
            loss = step()["loss"]
        sync(device)
        seconds = (time.perf_counter() - t0) / scale["steps"]
        result.update(s_per_step=seconds, s_per_epoch=seconds * EPOCH_IMAGES / scale["batch"],
                      loss=float(loss), precision=cfg.precision, compiled=cfg.compile)
    return result


def throughput(scale: dict, device: torch.device, peak: float, out: str) -> List[dict]:
    n = scale["batch"] * (scale["steps"] + scale["warmup"] + 2)
    images, labels = make_images(n, np.random.default_rng(0))
    labels = labels.astype(np.int64)
    rows = []
    for name in self_contained():
        r = {"target": name, **bench_target(name, scale, device, images, labels, out)}
        r["mfu"] = r["flops_per_step"] / r["s_per_step"] / peak if peak else float("nan")
        rows.append(r)
        print(f"{name:8s} {r['s_per_epoch']:8.2f} s/epoch  {r['flops_per_step'] / 1e9:8.1f} GFLOP/step  "
              f"MFU {r['mfu'] * 100:5.1f}%  ({r['precision']}{', compiled' if r['compiled'] else ''})", flush=True)
    return rows


def run_script(args: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "main_pretrain.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)


def training(scale: dict, device: torch.device, out: str, compile_: bool) -> List[str]:
    """Short real runs, pixel and ema, then a resume; returns the failures (empty: all good)."""
    data = write_fake_cifar10(os.path.join(out, "data"), per_batch=scale["per_batch"], test_size=256)
    failures = []
    for name in (PixelTarget.kind, EMATarget.kind):
        run_dir = os.path.join(out, f"train_{name}")
        common = ["--data_path", data, "--output_dir", run_dir, "--model", scale["model"], "--target", name,
                  "--wse", str(scale["switch"]), "--batch_size", str(scale["batch"]), "--warmup_epochs", "1",
                  "--save_freq", "1", "--print_freq", "5", "--device", device.type, "--num_workers", "0"]
        common += ["--compile"] if compile_ else []
        t0 = time.time()
        first = run_script([*common, "--epochs", str(scale["epochs"])])
        again = run_script([*common, "--epochs", str(scale["epochs"] + 1)])
        try:
            log, log_error = read_log(os.path.join(run_dir, "log.txt")), ""
        except BadRunFile as e:
            log, log_error = [], str(e)
        ok = {
            "exit 0": first.returncode == 0 and again.returncode == 0,
            f"log.txt: {log_error}": not log_error,
            "finite loss": bool(log) and all(math.isfinite(r["loss"]) for r in log),
            "resumed": "resumed from" in again.stdout and [r["epoch"] for r in log] == list(range(scale["epochs"] + 1)),
            "checkpoint": os.path.isfile(os.path.join(run_dir, f"checkpoint-{scale['epochs'] + 1}.pth")),
            "switch": name == PixelTarget.kind or (len(log) > scale["switch"]
                                                   and log[scale["switch"]]["regress"] == "feature"),
        }
        bad = [k for k, v in ok.items() if not v]
        losses = " ".join(f"{r['loss']:.3f}" for r in log)
        print(f"train {name}: {'ok' if not bad else 'FAILED ' + ', '.join(bad)}  losses {losses}  "
              f"({time.time() - t0:.0f}s)", flush=True)
        if bad:
            failures.append(f"{name}: {', '.join(bad)}\n{first.stderr[-2000:]}\n{again.stderr[-2000:]}")
    return failures


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="", help="work directory (default: a temporary one)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak (default: from the GPU name)")
    p.add_argument("--skip_training", action="store_true", help="part (a) only")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    scale = SCALES["gpu" if device.type == "cuda" else "cpu"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 or next((v for k, v in PEAKS.items() if k in name), 0.0)
    print(f"device: {name}; peak bf16 {peak / 1e12:.0f} TFLOP/s; torch {torch.__version__}; scale {scale}")
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    throughput(scale, device, peak, out)
    failures = [] if args.skip_training else training(scale, device, out, compile_=device.type == "cuda")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
