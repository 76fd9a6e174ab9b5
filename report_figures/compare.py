"""Two runs of the same study rows side by side, paired over seeds: one setting changed (e.g.
`--precision bf16` against fp32), everything else equal.

    python -m report_figures.compare output/study_fp32 output/study_bf16 --rows pixel ema --labels fp32 bf16

Reads A/NAME/seedS and B/NAME/seedS (reproduce.py's layout, report_figures/study.collect_study) and
prints a markdown table: per row, probe best acc@1, kNN acc, the last pretraining epoch's loss
and the pretraining seconds under A and B, and B - A paired over the seeds both have (the seed
fixes init, data order and masks, so the pairs differ only by the changed setting). Under the
table, the pretraining config.yaml keys on which A and B differ: a comparison that changed more
than it meant to shows it. A seed with a malformed run file is left out of both columns, said in one
line on stderr (util/runfiles.py).
"""
import os
from typing import Dict, List, Optional

from report_figures.runs import mean_std
from report_figures.study import COST, LOSS, cell, collect_study
from util.errors import ArgumentParser, UserError, cli
from util.runfiles import read_yaml

METRICS = {"best_acc1": "probe best acc@1", "knn_acc": "kNN acc", LOSS: "last pretrain loss", COST: "pretrain s"}
DIGITS = {LOSS: 4}  # losses differ in the third decimal; accuracies and seconds print 2
# config.yaml keys that always differ between two output roots
_PATH_KEYS = ("output_dir", "resume")


def compare_roots(root_a: str, root_b: str, names: List[str], subdir: str = "") -> Dict[str, dict]:
    """{row: {"seeds": [s, ...], "a": {metric: (mean, std, n)}, "b": {...}, "d": {metric: B - A paired}}}
    over the seeds with finished probes in both roots (None where there is none)."""
    a = collect_study(root_a, names, refs=[], subdir=subdir)
    b = collect_study(root_b, names, refs=[], subdir=subdir)
    out: Dict[str, dict] = {}
    for name in names:
        sa, sb = a[name]["seeds"], b[name]["seeds"]
        seeds = sorted(s for s in sa if s in sb)
        row: Dict[str, object] = {"seeds": seeds, "a": {}, "b": {}, "d": {}}
        for k in METRICS:
            both = [s for s in seeds if k in sa[s] and k in sb[s]]
            row["a"][k] = mean_std([sa[s][k] for s in both])
            row["b"][k] = mean_std([sb[s][k] for s in both])
            row["d"][k] = mean_std([sb[s][k] - sa[s][k] for s in both])
        out[name] = row
    return out


def config_differences(root_a: str, root_b: str, seeds: Dict[str, List[int]], subdir: str = "") -> Dict[str, tuple]:
    """{key: (value in A, value in B)} of the pretraining config.yaml keys that differ between the
    two roots for some row and seed of `seeds` ({row: seeds}: compare_roots' pairs, whose files
    collect_study read and found well-formed), output paths excepted."""
    diff: Dict[str, tuple] = {}
    for name, row_seeds in seeds.items():
        for seed in row_seeds:
            ca, cb = (read_yaml(os.path.join(root, name, subdir, f"seed{seed}", "pretrain", "config.yaml"))
                      for root in (root_a, root_b))
            if ca is None or cb is None:
                continue
            for k in sorted(set(ca) | set(cb)):
                if k not in _PATH_KEYS and ca.get(k) != cb.get(k):
                    diff.setdefault(k, (ca.get(k), cb.get(k)))
    return diff


def compare_table(stats: Dict[str, dict], labels=("A", "B"), diffs: Optional[Dict[str, tuple]] = None) -> str:
    """Markdown table of compare_roots' result, then the config keys that differ."""
    la, lb = labels
    head = ["row", "seeds"]
    for name in METRICS.values():
        head += [f"{name} {la}", f"{name} {lb}", f"Δ {name} ({lb} − {la})"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, st in stats.items():
        cells = [name, str(len(st["seeds"]))]
        for k in METRICS:
            dg = DIGITS.get(k, 2)
            cells += [cell(st["a"][k], digits=dg), cell(st["b"][k], digits=dg), cell(st["d"][k], True, dg)]
        lines.append("| " + " | ".join(cells) + " |")
    if diffs is not None:
        changed = ", ".join(f"{k}: {va} → {vb}" for k, (va, vb) in diffs.items()) or "nothing"
        lines += ["", f"Pretraining configs differ in: {changed}."]
    return "\n".join(lines) + "\n"


@cli
def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root_a", help="reproduce.py OUTPUT_ROOT of the baseline")
    ap.add_argument("root_b", help="reproduce.py OUTPUT_ROOT of the changed setting")
    ap.add_argument("--rows", nargs="+", required=True, metavar="NAME", help="row names (NAME/seedS folders)")
    ap.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"), help="column labels (default: folder names)")
    ap.add_argument("--subdir", default="", help="e.g. budget32 in the schedule plan's layout")
    a = ap.parse_args(argv)
    for root in (a.root_a, a.root_b):
        if not os.path.isdir(root):
            raise UserError(f"no run directory {root}")
    labels = a.labels or [os.path.basename(os.path.normpath(r)) for r in (a.root_a, a.root_b)]
    stats = compare_roots(a.root_a, a.root_b, a.rows, a.subdir)
    if not any(st["seeds"] for st in stats.values()):
        raise UserError(f"no seed of {', '.join(a.rows)} has a finished probe in both roots")
    diffs = config_differences(a.root_a, a.root_b, {n: st["seeds"] for n, st in stats.items()}, a.subdir)
    print(compare_table(stats, labels, diffs), end="")


if __name__ == "__main__":
    main()
