"""Linear-probe recipe sweep: accuracy of main_linprobe.py --cached_features over (epochs, blr).

Why it exists: LARS scales every step by trust 1e-3 * |w| / |g|, so a probe's learning rate means
far less than AdamW's, and a short schedule at the report's blr 0.1 can stop far from converged.
This runs the probe at each setting on one pretraining checkpoint and prints best acc@1 next to
the kNN accuracy of the same features (docs/RESULTS.md quotes its output).

    python benchmarks/probe_recipe.py --finetune output/study/ema/seed0/pretrain/checkpoint-last.pth \\
        --dataset fashion_mnist --data_path /usr/share/datasets/fashion-mnist --train_subset 6000

Extra flags after `--` go to every main_linprobe.py run (e.g. `-- --batch_size 512`).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from util.errors import ArgumentParser, cli  # noqa: E402
DEFAULT_GRID = ["30:0.1", "100:0.1", "300:0.1", "100:1", "300:1", "100:5", "300:5"]


def parse_setting(text: str):
    """'EPOCHS:BLR' -> (int, float)."""
    try:
        epochs, blr = text.split(":")
        return int(epochs), float(blr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCHS:BLR, e.g. 300:5, got {text!r}")


@cli
def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune", required=True, help="pretraining checkpoint")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data_path", default="./data")
    p.add_argument("--train_subset", type=int, default=0)
    p.add_argument("--model", default="", help="probe model (default: the checkpoint's encoder)")
    p.add_argument("--grid", nargs="+", type=parse_setting, default=[parse_setting(g) for g in DEFAULT_GRID],
                   metavar="EPOCHS:BLR")
    p.add_argument("--warmup_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="also write the rows here")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not os.path.isfile(args.finetune):
        p.error(f"--finetune {args.finetune}: no such file")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for epochs, blr in args.grid:
            out = os.path.join(tmp, f"e{epochs}_b{blr}")
            cmd = [sys.executable, "main_linprobe.py", "--finetune", args.finetune, "--dataset", args.dataset,
                   "--data_path", args.data_path, "--train_subset", str(args.train_subset),
                   "--epochs", str(epochs), "--blr", str(blr), "--warmup_epochs", str(min(args.warmup_epochs, epochs)),
                   "--batch_size", str(args.batch_size), "--cached_features", "--knn", "--device", args.device,
                   "--num_workers", "0", "--print_freq", "100000", "--save_freq", "100000", "--output_dir", out,
                   *(["--model", args.model] if args.model else []), *extra]
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed", file=sys.stderr)
                return proc.returncode
            with open(os.path.join(out, "results.json")) as f:
                res = json.load(f)
            rows.append({"epochs": epochs, "blr": blr, "best_acc1": res["best_acc1"], "last_acc1": res["last_acc1"],
                         "knn_acc": res.get("knn_acc"), "seconds": round(time.time() - t0, 1)})
            r = rows[-1]
            print(f"epochs {epochs:4d}  blr {blr:<6g}  probe best {r['best_acc1']:6.2f}  last {r['last_acc1']:6.2f}"
                  f"  kNN {r['knn_acc'] if r['knn_acc'] is not None else float('nan'):6.2f}  ({r['seconds']:.0f}s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
