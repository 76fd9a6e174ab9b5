"""Throughput benchmark: data path, pretraining step (every registered target, fast vs baseline),
precision comparison (every target: fp32 eager vs bf16 eager vs bf16 + torch.compile), fine-tuning
step, feature extraction. Every number is images/s over `--steps` timed steps after `--warmup`
untimed ones (compilation happens in the warm-up), with a device sync only at the two ends of the
timed region. Pretraining rows time the project's own step: engine_pretrain.build_engine ->
engine_pretrain.Pretraining.train_step.

    python benchmarks/throughput.py                        # auto device: every bench on CUDA, quick ones on CPU
    python benchmarks/throughput.py --device cpu --model mae_vit_smoke_patch4 --json out.json
    python benchmarks/throughput.py --device cuda --compile --batch_size 512
    python benchmarks/throughput.py --bench precision      # fp32 / bf16 / bf16+compile ratios only
"""
import itertools
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_vit  # noqa: E402
from models_mae import create_model  # noqa: E402
from target_encoder import HEADLINE_KINDS, self_contained  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from dataio.augment import PRETRAIN, finetune_transform  # noqa: E402
from engine_finetune import finetune_optimizer  # noqa: E402
from engine_pretrain import build_engine  # noqa: E402
from config import FinetuneConfig, PretrainConfig  # noqa: E402
from dataio.datasets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from dataio.in_memory import InMemoryLoader  # noqa: E402
from dataio.loader import TorchvisionLoader, build_train_loader  # noqa: E402
from util.nonfinite import NonFiniteGuard  # noqa: E402
from util.runtime import PRECISIONS, autocast, resolve_device, resolve_precision, speed_options  # noqa: E402
from util.trainer import Step  # noqa: E402
from util.errors import ArgumentParser, cli  # noqa: E402

EPOCH_IMAGES = 50_000  # CIFAR-10 train set
BENCHES = ("data", "pretrain", "precision", "finetune", "features")  # --bench choices, in run order
# What a CPU runs by default: a few minutes on 2 cores (the report's model); the rest on request.
CPU_QUICK = {"bench": ["data", "pretrain"], "targets": list(HEADLINE_KINDS)}
# The precision comparison's variants, (name, precision, compile); the first is the reference.
PRECISION_VARIANTS = (("fp32_eager", "fp32", False), ("bf16_eager", "bf16", False), ("bf16_compile", "bf16", True))


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


def measure(step, batches, steps: int, warmup: int, device: torch.device, timings=None) -> float:
    """images/s of `step(batch)` over `steps` batches drawn from `batches`, after `warmup` ones
    (their seconds, compilation included, go to timings["warmup_s"] when a dict is given)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(next(batches))
    sync(device)
    if timings is not None:
        timings["warmup_s"] = time.perf_counter() - t0
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
    mem = InMemoryLoader(images, labels, args.batch_size, device, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                         **PRETRAIN.in_memory())
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


def pretrain_config(args, device, kind: str, precision: str, compile_: bool, data_loader: str = "in_memory"):
    """The pretraining recipe timed for one target kind. k = wse = 1 and a per-step EMA update,
    so that at the switch epoch the target pass and the EMA update are inside the timed step."""
    return PretrainConfig(model=args.model, batch_size=args.batch_size, lr=1e-4, target=kind, epochs=10,
                          warmup_epochs=0, k=1, wse=1, ema_every="step", precision=precision,
                          compile=compile_, data_loader=data_loader, num_workers=max(args.workers),
                          device=device.type)


def engine_step(cfg, images, labels, device, steps_per_epoch: int):
    """The project's own pretraining step for `cfg`: build_engine, then
    Pretraining.train_step at the target's first feature epoch (pixel: epoch 0), where the
    target encoder exists and its pass is part of the step. Returns (engine, step(batch))."""
    if cfg.compile:
        torch._dynamo.reset()  # fresh graphs per measured variant: never the recompile limit's eager fallback
    torch.manual_seed(0)
    engine = build_engine(cfg, device, (images, labels, 10), CIFAR10_MEAN, CIFAR10_STD, steps_per_epoch)
    epoch = engine.target.switch_epoch or 0
    engine.begin_epoch(epoch, resumed=False)  # creates the target encoder (and compiles it with --compile)
    guard, count = NonFiniteGuard(), itertools.count(1)

    def step(batch):
        k = next(count)
        engine.train_step(batch, Step(epoch, k, k, guard))
    return engine, step


def bench_pretrain(images, args, device, fast: bool, kind: str):
    """Pretraining step images/s for one target kind, in its first epoch regressing features.
    fast: in-memory loader, --precision, fused AdamW on CUDA, --compile; baseline: torchvision's
    per-image pipeline, fp32 eager, the plain multi-tensor AdamW. Both run the engine's step."""
    cfg = pretrain_config(args, device, kind, args.precision if fast else "fp32", args.compile and fast,
                          "in_memory" if fast else "torchvision")
    labels = np.zeros(len(images), dtype=np.int64)
    loader = build_train_loader(cfg, images, labels, device, CIFAR10_MEAN, CIFAR10_STD, PRETRAIN)
    engine, step = engine_step(cfg, images, labels, device, len(loader))
    if not fast:  # the same parameter groups, without the fused kernel
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                  for g in engine.optimizer.param_groups]
        engine.optimizer = torch.optim.AdamW(groups, fused=False)
    batches = forever(loader)
    rate = measure(step, batches, args.steps, args.warmup, device)
    batches.close()
    return dict(bench=f"pretrain_{kind}", variant="fast" if fast else "baseline",
                dtype=dtype_of(cfg.precision, device), images_per_s=rate,
                s_per_50k_epoch=EPOCH_IMAGES / rate, compile=bool(cfg.compile))


def bench_precision(images, args, device):
    """fp32 eager vs bf16 eager vs bf16 + torch.compile of the engine's pretraining step, for
    each target in --targets (default: every registered one), on the same few pre-drawn
    in-memory batches (the step alone, no loader cost). The three variants of a target are
    timed in turn, --repeats rounds, and each keeps its best round (a shared machine's load
    hits them alike); ratio = that variant's img/s / fp32 eager's img/s of the same target."""
    labels = np.zeros(len(images), dtype=np.int64)
    rows = []
    for kind in args.targets:
        runs, rates, warmups = {}, {}, {}
        for variant, precision, compile_ in PRECISION_VARIANTS:
            cfg = pretrain_config(args, device, kind, precision, compile_)
            loader = build_train_loader(cfg, images, labels, device, CIFAR10_MEAN, CIFAR10_STD, PRETRAIN)
            runs[variant] = engine_step(cfg, images, labels, device, len(loader))[1], first_batches(loader, 4)
        for round_ in range(args.repeats):
            for variant, (step, batches) in runs.items():
                timings, warmup = {}, 0 if round_ else max(args.warmup, 1)  # compilation: never timed
                rate = measure(step, itertools.cycle(batches), args.steps, warmup, device, timings)
                rates[variant] = max(rate, rates.get(variant, 0.0))
                warmups.setdefault(variant, timings["warmup_s"])
        rows += [precision_row(kind, variant, precision, compile_, device, rates, warmups)
                 for variant, precision, compile_ in PRECISION_VARIANTS]
    return rows


def precision_row(kind, variant, precision, compile_, device, rates, warmups):
    """One precision row; printed as it is made (a CPU run of the report's model takes minutes)."""
    rate, reference = rates[variant], rates[PRECISION_VARIANTS[0][0]]
    print(f"{kind:8s} {variant:14s} {rate_text(rate)} img/s  x{rate / reference:.2f} vs fp32 eager  "
          f"(warm-up {warmups[variant]:.1f}s)", flush=True)
    return dict(bench=f"precision_{kind}", variant=variant, dtype=dtype_of(precision, device), compile=compile_,
                images_per_s=rate, s_per_50k_epoch=EPOCH_IMAGES / rate, ratio=rate / reference,
                warmup_s=warmups[variant])


def first_batches(loader, count: int):
    """The loader's first `count` batches of epoch 0, made once (they are replayed, not re-drawn)."""
    loader.set_epoch(0)
    return list(itertools.islice(iter(loader), count))


def bench_finetune(images, args, device, loader_workers=None):
    """Fine-tuning step (layer-decay AdamW, label smoothing) on precomputed batches, or fed by
    the torchvision RandAugment pipeline with `loader_workers` workers."""
    torch.manual_seed(0)
    cfg = FinetuneConfig(model=models_vit.encoder_name_for(args.model), batch_size=args.batch_size,
                         lr=1e-4, precision=args.precision, compile=args.compile)
    model = models_vit.create_model(cfg.model, global_pool=cfg.global_pool,
                                    drop_path_rate=cfg.drop_path).to(device).train()
    forward = speed_options(model, cfg, device)
    optimizer = finetune_optimizer(model, cfg)
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


def rate_text(images_per_s: float) -> str:
    """img/s, 10 wide: one decimal, three below 10 img/s (emulated bf16 on the report's model)."""
    return f"{images_per_s:>10.1f}" if images_per_s >= 10 else f"{images_per_s:>10.3f}"


def dtype_of(precision: str, device: torch.device) -> str:
    """What autocast actually runs in (util.runtime.autocast: bf16 on CUDA and CPU)."""
    return "bf16" if precision == "bf16" and device.type in ("cuda", "cpu") else "fp32"


def parse(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--model", default="mae_vit_tiny_patch4", help="models_mae name (mae_vit_smoke_patch4: fast)")
    p.add_argument("--batch_size", type=int, default=None, help="default 64 on CPU, 512 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 1 CPU, 10 CUDA; precision bench: at least 1)")
    p.add_argument("--images", type=int, default=10000, help="random uint8 32x32 images")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 0 2 on CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fast path autocast (auto: bf16 where the device runs it natively)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path (CUDA and CPU)")
    p.add_argument("--bench", nargs="+", default=None, choices=BENCHES,
                   help="which comparisons to run (default: all on CUDA; on a CPU the quick ones: "
                        f"{' '.join(CPU_QUICK['bench'])}); precision = fp32 eager vs bf16 eager vs "
                        "bf16+compile of the pretraining step, each target")
    p.add_argument("--targets", nargs="+", default=None, choices=list(self_contained()),
                   help="pretrain and precision benches: these target kinds (default on CUDA: every registered "
                        f"one that needs no file; on a CPU: {' '.join(CPU_QUICK['targets'])}; --target teacher "
                        "costs what random does for a teacher of the same size)")
    p.add_argument("--repeats", type=int, default=1,
                   help="precision bench: timed rounds per variant, taken in turn; the best is kept")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (default: torch's choice); 1 = steadier on a shared CPU")
    p.add_argument("--json", default="", help="write the rows here as a list of dicts")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.precision = resolve_precision(args.precision, resolve_device(args.device))
    cuda = resolve_device(args.device).type == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.workers = args.workers or ([0, 4, 8, 16] if cuda else [0, 2])
    quick = not cuda and args.bench is None and args.targets is None
    args.bench = args.bench or (list(BENCHES) if cuda else CPU_QUICK["bench"])
    args.targets = args.targets or (list(self_contained()) if cuda else CPU_QUICK["targets"])
    if quick:  # a CPU takes minutes per row of the rest (compile, every target)
        print(f"quick CPU run: --bench {' '.join(args.bench)} --targets {' '.join(args.targets)}; everything: "
              f"--bench {' '.join(BENCHES)} --targets {' '.join(self_contained())} (tens of minutes)", flush=True)
    return args


def run_benches(images, args, device):
    """The rows of every bench in --bench, in BENCHES order."""
    rows = []
    if "data" in args.bench:
        rows += bench_data(images, args, device)
    if "pretrain" in args.bench:
        for kind in args.targets:
            fast, base = (bench_pretrain(images, args, device, f, kind) for f in (True, False))
            fast["ratio"] = fast["images_per_s"] / base["images_per_s"]  # fast / baseline
            rows += [fast, base]
            print(f"[{kind}] pretrain step: {fast['images_per_s']:.1f} img/s fast, {base['images_per_s']:.1f} "
                  f"baseline", flush=True)  # progress: a row takes a while on a CPU
    if "precision" in args.bench:
        rows += bench_precision(images, args, device)
    if "finetune" in args.bench:
        rows += [bench_finetune(images, args, device), bench_finetune(images, args, device, max(args.workers))]
    if "features" in args.bench:
        rows.append(bench_features(images, args, device))
    return rows


def print_table(rows, args) -> None:
    """One line per row, what the ratios mean, and seconds per 50k-image epoch."""
    print(f"\n{args.model}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'bench':<20}{'variant':<26}{'device':<24}{'batch':>6} {'dtype':<6}{'img/s':>10}{'ratio':>8}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        print(f"{r['bench']:<20}{r['variant']:<26}{r['device']:<24}{r['batch_size']:>6} {r['dtype']:<6}"
              f"{rate_text(r['images_per_s'])}{ratio:>8}")
    print("ratio: data rows = in_memory / that loader; pretrain fast rows = fast / baseline; "
          "precision rows = that variant / fp32_eager of the same target")
    for r in rows:
        if "s_per_50k_epoch" in r:
            print(f"{r['bench']} {r['variant']}: {EPOCH_IMAGES} / {r['images_per_s']:.1f} img/s "
                  f"= {r['s_per_50k_epoch']:.1f} s per 50k-image epoch")


@cli
def main(argv=None):
    """Run the benchmarks --bench names, print the table, write --json; returns the rows."""
    args = parse(argv)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    rows = run_benches(images, args, device)
    for r in rows:
        r.update(device=name, batch_size=args.batch_size, model=args.model, steps=args.steps)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
