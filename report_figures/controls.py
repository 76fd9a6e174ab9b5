"""Is it bootstrapping that helps, or any feature target? (issue 27; docs/RESULTS.md section 7)

The schedule plan's rows at each budget, each compared paired by seed with two references at the
same budget: pixel MAE (does the row beat pixels?) and the frozen random-init teacher (does a
teacher that learns beat one that never does?). A row "beats" a reference when both its probe and
its kNN deltas are beyond 2 paired std.

    python -m report_figures.controls output/schedule --budgets 32 64 \\
        --rows pixel random mae_k hog mae_k_torch ema_torch teacher_pixel teacher_random

writes controls_results.md and controls.png into the runs folder (or --out).
"""
import os
from typing import Dict, List, Optional

from report_figures.plans import load_plan
from report_figures.schedule import add_flops, budget_dir
from report_figures.study import DELTAS, FLOPS, cell, collect_study
from util.errors import ArgumentParser, UserError, cli

# The two references, rows of the schedule plan (configs/schedule/plan.yaml: controls): pixel MAE
# and the frozen random-init teacher.
REFS = tuple(load_plan("schedule")["controls"])
BASE, RANDOM = REFS
NAMES = {"best_acc1": "probe", "knn_acc": "kNN"}


def collect_controls(runs_root: str, rows: List[str], budgets: List[int]) -> Dict[int, Dict[str, dict]]:
    """{budget: collect_study's stats of RUNS/ROW/budgetB with d_pixel_* and d_random_*, plus each
    run's pretraining FLOPs}."""
    out = {}
    for b in budgets:
        names = list(dict.fromkeys(list(REFS) + rows))
        out[b] = collect_study(runs_root, names, list(REFS), subdir=budget_dir(b))
        add_flops(out[b], runs_root, b)
    return out


def beats(st: dict, ref: str) -> bool:
    """Both probe and kNN ahead of `ref` by more than 2 paired std, over 3 or more seeds."""
    for k in DELTAS:
        d = st.get(f"d_{ref}_{k}")
        if d is None or d[2] < 3 or d[0] <= 2 * d[1]:
            return False
    return True


def controls_table(stats: Dict[int, Dict[str, dict]], rows: List[str]) -> str:
    """Markdown: a line per row and budget with seeds, probe, kNN, paired Δ vs each reference and
    the pretraining FLOPs relative to pixel's at that budget."""
    head = (["row", "budget", "seeds", "probe", "kNN"] + [f"Δ {NAMES[k]} vs {r}" for r in REFS for k in DELTAS]
            + [f"FLOPs vs {BASE}", f"beats {BASE} and {RANDOM}"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in rows:
        for b, at in stats.items():
            st = at.get(name)
            if not st or not st["seeds"]:
                continue
            pixel_flops = at.get(BASE, {}).get(FLOPS)
            ratio = f"{st[FLOPS][0] / pixel_flops[0]:.2f}×" if st.get(FLOPS) and pixel_flops else "-"
            verdict = "-" if name in REFS else ("yes" if all(beats(st, r) for r in REFS) else "no")
            lines.append("| " + " | ".join(
                [name, str(b), str(len(st["seeds"])), cell(st["best_acc1"]), cell(st["knn_acc"])]
                + [cell(st.get(f"d_{r}_{k}"), True) for r in REFS for k in DELTAS] + [ratio, verdict]) + " |")
    return "\n".join(lines) + "\n"


def plot_controls(stats: Dict[int, Dict[str, dict]], rows: List[str], path: str) -> None:
    """Paired Δ probe (left) and Δ kNN (right) vs the random teacher, a bar per row and budget,
    error bars = paired std (pixel MAE's bar included)."""
    from report_figures.plots import pyplot  # here: matplotlib is only needed for the figure
    plt = pyplot()
    budgets = list(stats)
    shown = [n for n in rows if n != RANDOM and any(stats[b].get(n, {}).get("seeds") for b in budgets)]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(shown), 3.6), sharey=False)
    width = 0.8 / max(len(budgets), 1)
    for ax, k in zip(axes, DELTAS):
        for j, b in enumerate(budgets):
            xs, ms, sds = [], [], []
            for i, n in enumerate(shown):
                d = stats[b].get(n, {}).get(f"d_{RANDOM}_{k}")
                if d is not None:
                    xs.append(i + (j - (len(budgets) - 1) / 2) * width)
                    ms.append(d[0])
                    sds.append(d[1])
            ax.bar(xs, ms, width, yerr=sds, capsize=2, label=f"{b} epochs")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"Δ {NAMES[k]} vs {RANDOM} (paired)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_controls(runs_root: str, rows: List[str], budgets: List[int], out_dir: Optional[str] = None) -> List[str]:
    """controls_results.md and controls.png into out_dir (default: runs_root); returns their paths."""
    out_dir = out_dir or runs_root
    stats = collect_controls(runs_root, rows, budgets)
    if not any(st["seeds"] for at in stats.values() for st in at.values()):
        raise UserError(f"{runs_root}: no finished probe of rows {', '.join(rows)} at budgets "
                        f"{', '.join(map(str, budgets))}")
    os.makedirs(out_dir, exist_ok=True)
    md, png = os.path.join(out_dir, "controls_results.md"), os.path.join(out_dir, "controls.png")
    with open(md, "w") as f:
        f.write(controls_table(stats, rows))
    plot_controls(stats, rows, png)
    return [md, png]


@cli
def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="the schedule plan's output root (RUNS/ROW/budgetB/seedS)")
    ap.add_argument("--budgets", type=int, nargs="+", required=True)
    ap.add_argument("--rows", nargs="+", required=True)
    ap.add_argument("--out", default="", help="where the table and figure go (default: RUNS)")
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows if r not in load_plan("schedule")["rows"]]
    if unknown:
        raise UserError(f"--rows {' '.join(unknown)}: not rows of configs/schedule/plan.yaml")
    written = write_controls(args.runs, args.rows, args.budgets, args.out or None)
    with open(written[0]) as f:
        print(f.read())
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
