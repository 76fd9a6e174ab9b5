"""Throughput benchmark: data path, pretraining step (every registered target, fast vs baseline),
fine-tuning step, feature extraction. Every number is images/s over `--steps` timed steps after `--warmup`
untimed ones, with a device sync only at the two ends of the timed region.

    python benchmarks/throughput.py                        # auto device, defaults per device
    python benchmarks/throughput.py --device cpu --model mae_vit_smoke_patch4 --json out.json
    python benchmarks/throughput.py --device cuda --compile --batch_size 512
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_finetune  # noqa: E402
import main_pretrain  # noqa: E402
import models_vit  # noqa: E402
from models_mae import create_model  # noqa: E402
from target_encoder import TARGETS, Target, build_target  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from dataio.augment import PRETRAIN, finetune_transform  # noqa: E402
from config import FinetuneConfig, PretrainConfig  # noqa: E402
from dataio.datasets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from dataio.in_memory import InMemoryLoader  # noqa: E402
from dataio.loader import TorchvisionLoader  # noqa: E402
from util.runtime import PRECISIONS, autocast, resolve_device, resolve_precision, speed_options  # noqa: E402

EPOCH_IMAGES = 50_000  # CIFAR-10 train set


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA only; CPU ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forever(loader):
    """Endless (imgs, labels) batches from a loader with set_epoch, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(step, batches, steps: int, warmup: int, device: torch.device) -> float:
    """images/s of `step(batch)` over `steps` batches drawn from `batches`, after `warmup` ones."""
    for _ in range(warmup):
        step(next(batches))
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        n += batch[0].shape[0]  # a shape, not a value: no host sync
    sync(device)
    return n / (time.perf_counter() - t0)


def bench_data(images, args, device):
    """Loader alone: in-memory batched crop+flip vs torchvision's per-image PIL pipeline."""
    labels = np.zeros(len(images), dtype=np.int64)
    steps = max(4 * args.steps, 10)
    mem = pretrain_loader(images, labels, args.batch_size, device, in_memory=True)
    rows = [dict(bench="data", variant="in_memory", images_per_s=measure(
        lambda b: None, forever(mem), steps, args.warmup, device))]
    pipelines = [("torchvision", PRETRAIN.torchvision(32, CIFAR10_MEAN, CIFAR10_STD)),
                 ("torchvision_finetune", finetune_transform(FinetuneConfig(), 32, CIFAR10_MEAN, CIFAR10_STD))]
    for name, transform in pipelines:
        for w in args.workers:
            batches = forever(TorchvisionLoader(images, labels, transform, args.batch_size, device,
                                                num_workers=w))
            rate = measure(lambda b: None, batches, steps, args.warmup, device)
            batches.close()  # shuts the worker processes down
            rows.append(dict(bench="data", variant=f"{name}_w{w}", num_workers=w, images_per_s=rate,
                             ratio=rows[0]["images_per_s"] / rate))  # in-memory / this
    for r in rows:
        r["dtype"] = "fp32"  # the loaders' output
    return rows


def pretrain_loader(images, labels, batch_size: int, device, in_memory: bool, num_workers: int = 0):
    """The pretraining recipe's loader: batched on the device, or torchvision's per-image pipeline."""
    if in_memory:
        return InMemoryLoader(images, labels, batch_size, device, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                              **PRETRAIN.in_memory())
    return TorchvisionLoader(images, labels, PRETRAIN.torchvision(32, CIFAR10_MEAN, CIFAR10_STD), batch_size,
                             device, num_workers=num_workers)


def pretrain_step(model, forward, target: Target, optimizer, cfg, epoch: int):
    """One step as engine_pretrain.train_one_epoch runs it (minus lr schedule and logging)."""
    heads = target.heads(epoch)

    def step(batch):
        imgs = batch[0]
        with autocast(imgs.device, cfg.precision):
            preds, mask = forward(imgs, cfg.mask_ratio, heads)
            loss, _ = target.loss(model, imgs, preds, mask, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        target.on_step_end(epoch, model.encoder)
    return step


def bench_pretrain(images, args, device, fast: bool, kind: str):
    """Pretraining step images/s for one target kind, in its first epoch regressing features;
    fast = in-memory + bf16 + fused AdamW (+compile)."""
    torch.manual_seed(0)
    cfg = PretrainConfig(model=args.model, batch_size=args.batch_size, lr=1e-4, target=kind,
                         precision=args.precision if fast else "fp32", compile=args.compile and fast,
                         k=1, wse=1, ema_every="step")  # EMA kinds: the per-step update is timed too
    model = create_model(cfg.model).to(device)
    forward = speed_options(model, cfg, device) if fast else model
    optimizer = main_pretrain.build_optimizer(model, cfg)  # fused on CUDA
    if not fast:  # the plain multi-tensor AdamW
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                  for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, fused=False)
    target = build_target(cfg)
    epoch = target.switch_epoch or 0  # pixel: never switches
    target.on_epoch_start(epoch, model.encoder)  # creates the target encoder: its pass is timed
    labels = np.zeros(len(images), dtype=np.int64)
    loader = pretrain_loader(images, labels, args.batch_size, device, fast, max(args.workers))
    model.train()
    batches = forever(loader)
    rate = measure(pretrain_step(model, forward, target, optimizer, cfg, epoch), batches,
                   args.steps, args.warmup, device)
    batches.close()
    return dict(bench=f"pretrain_{kind}", variant="fast" if fast else "baseline",
                dtype=dtype_of(cfg.precision, device), images_per_s=rate,
                s_per_50k_epoch=EPOCH_IMAGES / rate, compile=bool(cfg.compile))


def bench_finetune(images, args, device, loader_workers=None):
    """Fine-tuning step (layer-decay AdamW, label smoothing) on precomputed batches, or fed by
    the torchvision RandAugment pipeline with `loader_workers` workers."""
    torch.manual_seed(0)
    cfg = FinetuneConfig(model=models_vit.encoder_name_for(args.model), batch_size=args.batch_size,
                         lr=1e-4, precision=args.precision, compile=args.compile)
    model = models_vit.create_model(cfg.model, global_pool=cfg.global_pool,
                                    drop_path_rate=cfg.drop_path).to(device).train()
    forward = speed_options(model, cfg, device)
    optimizer = main_finetune.build_optimizer(model, cfg)
    criterion = LabelSmoothingCrossEntropy(cfg.smoothing)

    def step(batch):
        x, y = batch
        with autocast(x.device, cfg.precision):
            loss = criterion(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    labels = np.random.default_rng(0).integers(0, 10, len(images))
    if loader_workers is None:
        batches, variant = precomputed(images, labels, args.batch_size, device), "precomputed"
    else:
        batches = forever(TorchvisionLoader(images, labels, finetune_transform(cfg, 32, CIFAR10_MEAN, CIFAR10_STD),
                                            args.batch_size, device, num_workers=loader_workers))
        variant = f"torchvision_randaug_w{loader_workers}"
    rate = measure(step, batches, args.steps, args.warmup, device)
    batches.close()
    return dict(bench="finetune", variant=variant, dtype=dtype_of(cfg.precision, device),
                images_per_s=rate, s_per_50k_epoch=EPOCH_IMAGES / rate)


def precomputed(images, labels, batch_size: int, device, count: int = 4):
    """Cycle through `count` normalised batches made once on the device (no loader cost)."""
    x = torch.from_numpy(images[:count * batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.5) / 0.25
    y = torch.as_tensor(labels[:count * batch_size], dtype=torch.int64, device=device)
    i = 0
    while True:
        s = slice((i % count) * batch_size, (i % count + 1) * batch_size)
        yield x[s], y[s]
        i += 1


def bench_features(images, args, device):
    """Encoder forward_features in eval mode under no_grad (kNN monitor / probe features)."""
    encoder = create_model(args.model).encoder.to(device).eval()
    precision = args.precision
    labels = np.zeros(len(images), dtype=np.int64)

    @torch.no_grad()
    def step(batch):
        with autocast(device, precision):
            encoder.forward_features(batch[0])
    rate = measure(step, precomputed(images, labels, args.batch_size, device), args.steps, args.warmup, device)
    return dict(bench="features", variant="eval_no_grad", dtype=dtype_of(precision, device), images_per_s=rate)


def dtype_of(precision: str, device: torch.device) -> str:
    """What autocast actually runs in (util.runtime.autocast: bf16 on CUDA and CPU)."""
    return "bf16" if precision == "bf16" and device.type in ("cuda", "cpu") else "fp32"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--model", default="mae_vit_tiny_patch4", help="models_mae name (mae_vit_smoke_patch4: fast)")
    p.add_argument("--batch_size", type=int, default=None, help="default 64 on CPU, 512 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 10 CUDA)")
    p.add_argument("--images", type=int, default=10000, help="random uint8 32x32 images")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 0 2 on CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fast path autocast (auto: bf16 where the device runs it natively)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path (CUDA and CPU)")
    p.add_argument("--json", default="", help="write the rows here as a list of dicts")
    args = p.parse_args(argv)
    args.precision = resolve_precision(args.precision, resolve_device(args.device))
    cuda = resolve_device(args.device).type == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.workers = args.workers or ([0, 4, 8, 16] if cuda else [0, 2])
    return args


def main(argv=None):
    """Run every benchmark, print the table, write --json; returns the rows."""
    args = parse(argv)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    rows = bench_data(images, args, device)
    for kind in TARGETS:
        fast, base = (bench_pretrain(images, args, device, f, kind) for f in (True, False))
        fast["ratio"] = fast["images_per_s"] / base["images_per_s"]  # fast / baseline
        rows += [fast, base]
    rows += [bench_finetune(images, args, device), bench_finetune(images, args, device, max(args.workers)),
             bench_features(images, args, device)]
    for r in rows:
        r.update(device=name, batch_size=args.batch_size, model=args.model, steps=args.steps)
    print(f"\n{args.model}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'bench':<16}{'variant':<28}{'device':<24}{'batch':>6} {'dtype':<6}{'img/s':>10}{'ratio':>8}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        print(f"{r['bench']:<16}{r['variant']:<28}{r['device']:<24}{r['batch_size']:>6} {r['dtype']:<6}"
              f"{r['images_per_s']:>10.1f}{ratio:>8}")
    print("ratio: data rows = in_memory / that loader; pretrain fast rows = fast / baseline")
    for r in rows:
        if "s_per_50k_epoch" in r:
            print(f"{r['bench']} {r['variant']}: {EPOCH_IMAGES} / {r['images_per_s']:.1f} img/s "
                  f"= {r['s_per_50k_epoch']:.1f} s per 50k-image epoch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
