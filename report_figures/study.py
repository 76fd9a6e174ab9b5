"""Table and figure of the improvement study (reproduce.py --plan study), from run directories.

Reads RUNS/NAME/seedS/{pretrain,linprobe}/ as written by reproduce.py and writes into OUT:
    study_results.md    per row: probe best / last acc@1 and kNN acc (mean +- std over seeds),
                        the paired differences to pixel MAE and to the report's EMA-MAE (same
                        seeds), the final target / prediction spread (a collapsing target shows
                        as a std near 0)
    study_results.json  the same numbers, machine-readable
    study.png           probe and kNN accuracy per row, error bars = std over seeds
"""
import json
import os
from typing import Dict, List, Optional

from report_figures.plans import SCRATCH, load_plan
from report_figures.runs import mean_std, read_seed, seed_dirs

METRICS = ("best_acc1", "last_acc1", "knn_acc")
DELTAS = ("best_acc1", "knn_acc")
# Collapse signals from the last pretraining epoch's log line (target_encoder.Target.health).
HEALTH = ("target_std", "pred_std", "target_erank")
# The last pretraining epoch's loss (pixel or feature, as that epoch regressed; comparable between
# two runs of the same row, not across rows).
LOSS = "pretrain_loss"
# Pretraining wall-clock: the sum of the epochs' "seconds" in pretrain/log.txt (training loop only).
COST = "pretrain_seconds"
# Pretraining compute, counted (report_figures/flops.py): the schedule plan's machine-independent cost.
FLOPS = "pretrain_flops"
# The short fine-tuning's (plan.yaml's finetune_rows) last-epoch test acc@1: the last epoch, not the
# best, so that no choice is made on the test set.
FINETUNE = "ft_acc1"


def pretrain_seconds(log: List[dict]) -> Optional[float]:
    """Seconds of pretraining in a log.txt's records (one per epoch; a repeated epoch counts once)."""
    per_epoch = {r.get("epoch"): float(r["seconds"]) for r in log if r.get("seconds") is not None}
    return sum(per_epoch.values()) if per_epoch else None


def references(plan: str = "study") -> List[str]:
    """The rows every row is compared with (configs/PLAN/plan.yaml); the first is the baseline."""
    return list(load_plan(plan)["references"])


def collect_study(runs_root: str, names: List[str], refs: Optional[List[str]] = None,
                  subdir: str = "") -> Dict[str, dict]:
    """{row: {"seeds": {seed: {metric: value}}, metric: (mean, std, n) | None, ...}} for finished probes,
    with d_REF_METRIC: the paired differences to each row of `refs` (default: references()).
    Runs are read from RUNS/NAME/SUBDIR/seedS (subdir: e.g. the schedule plan's "budget32"); a seed
    with a malformed file is left out, said on stderr (util/runfiles.py)."""
    refs = references() if refs is None else refs
    out: Dict[str, dict] = {}
    for name in names:
        per_seed: Dict[int, dict] = {}
        for seed, sd in seed_dirs(os.path.join(runs_root, name, subdir)):
            files = read_seed(name, seed, sd) or {}
            res = files.get("linprobe", {}).get("results")
            if res is None:
                continue
            vals = {k: float(res[k]) for k in METRICS if res.get(k) is not None}
            ft = files.get("finetune", {}).get("results")
            if ft and ft.get("last_acc1") is not None:
                vals[FINETUNE] = float(ft["last_acc1"])
            log = files.get("pretrain", {}).get("log")
            if log:  # last pretraining epoch: how spread out targets and predictions still are
                vals.update({k: float(log[-1][k]) for k in HEALTH if k in log[-1]})
                if "loss" in log[-1]:
                    vals[LOSS] = float(log[-1]["loss"])
                seconds = pretrain_seconds(log)
                if seconds is not None:
                    vals[COST] = seconds
            per_seed[seed] = vals
        row: Dict[str, object] = {"seeds": per_seed}
        for k in METRICS + HEALTH + (LOSS, COST, FINETUNE):
            row[k] = mean_std([v.get(k) for v in per_seed.values()])
        out[name] = row
    for name, row in out.items():  # paired over seeds: the seed fixes init, data order and masks
        for ref in refs:
            base = out.get(ref)
            for k in DELTAS + (FINETUNE,):
                diffs = [] if base is None or name == ref else [
                    v[k] - base["seeds"][s][k] for s, v in row["seeds"].items()
                    if k in v and s in base["seeds"] and k in base["seeds"][s]]
                row[f"d_{ref}_{k}"] = mean_std(diffs)
    return out


def cell(st: Optional[tuple], signed: bool = False, digits: int = 2) -> str:
    """(mean, std, n) -> "mean ± std" ("mean" alone for one value, "-" for None)."""
    if st is None:
        return "-"
    m, sd, n = st
    txt = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return f"{txt} ± {sd:.{digits}f}" if n > 1 else txt


def study_table(stats: Dict[str, dict], refs: Optional[List[str]] = None) -> str:
    """Markdown table of collect_study's result, one line per row in its order (with the short
    fine-tuning's columns when a row has one)."""
    refs = references() if refs is None else refs
    deltas = [(ref, k) for ref in refs for k in DELTAS]
    names = {"best_acc1": "probe", "knn_acc": "kNN"}
    ft_head, ft_cells = finetune_columns(stats, refs[0])
    head = (["row", "seeds", "probe best acc@1", "probe last acc@1", "kNN acc"]
            + [f"Δ {names[k]} vs {ref}" for ref, k in deltas] + ["target std", "pred std", "target erank"] + ft_head)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, st in stats.items():
        cells = ([name, str(len(st["seeds"])), cell(st["best_acc1"]), cell(st["last_acc1"]), cell(st["knn_acc"])]
                 + [cell(st[f"d_{ref}_{k}"], True) for ref, k in deltas]
                 + [cell(st["target_std"]), cell(st["pred_std"]), cell(st["target_erank"])] + ft_cells(st))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finetune_columns(stats: Dict[str, dict], ref: str):
    """The short fine-tuning's table columns ([] when no row has one): its head, and a function
    giving one row's cells (last-epoch acc@1, and its paired difference to `ref`)."""
    if not any(st.get(FINETUNE) for st in stats.values()):
        return [], lambda st: []
    return (["fine-tune acc@1 (last epoch)", f"Δ fine-tune vs {ref}"],
            lambda st: [cell(st.get(FINETUNE)), cell(st.get(f"d_{ref}_{FINETUNE}"), True)])


def plot_study(stats: Dict[str, dict], path: str, baseline: str) -> None:
    """Two panels (probe best acc@1, kNN acc): a bar per row, std over seeds, `baseline` dashed."""
    from report_figures.plots import pyplot  # here: report_figures.plots imports torch, the dry run needs none
    plt = pyplot()
    names = list(stats)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, key, title in zip(axes, ("best_acc1", "knn_acc"), ("linear probe acc@1 (%)", "kNN acc (%)")):
        vals = [stats[n][key] for n in names]
        means = [v[0] if v else 0.0 for v in vals]
        errs = [v[1] if v else 0.0 for v in vals]
        colors = ["grey" if n == SCRATCH else "tab:blue" if n == baseline else "tab:orange" for n in names]
        ax.barh(range(len(names)), means, xerr=errs, color=colors, capsize=3)
        if stats.get(baseline, {}).get(key):
            ax.axvline(stats[baseline][key][0], color="tab:blue", ls="--", lw=1)
        finite = [m for m, v in zip(means, vals) if v]
        if finite:
            ax.set_xlim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study(runs_root: str, names: List[str], out_dir: str, plan: str = "study") -> List[str]:
    """Write study_results.md/.json and study.png into OUT_DIR, each row compared with the
    plan's references; returns their paths."""
    refs = references(plan)
    stats = collect_study(runs_root, names, refs)
    os.makedirs(out_dir, exist_ok=True)
    md, js, png = (os.path.join(out_dir, f) for f in ("study_results.md", "study_results.json", "study.png"))
    with open(md, "w") as f:
        f.write(f"# Study results ({os.path.basename(os.path.normpath(runs_root))})\n\n" + study_table(stats, refs))
    with open(js, "w") as f:
        json.dump(stats, f, indent=2)
    plot_study(stats, png, refs[0])
    return [md, js, png]
