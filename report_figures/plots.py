"""The report's plots from collected rows (report_figures.runs.collect): accuracy curves, sweeps,
pretraining loss."""
from typing import Callable, Dict, Optional

from report_figures.plans import SCRATCH
from report_figures.runs import first_seed, mean_std, summarize
from target_encoder import TARGETS, EMATarget, MAEKTarget

# (parameter on the x axis, which rows (by their nominal options), title, log x axis)
SWEEPS = (
    ("k", lambda n: n["family"] == MAEKTarget.kind, "MAE-K: refresh period K", True),
    ("wse", lambda n: n["family"] == EMATarget.kind and n.get("tau") == 0.995,
     "EMA-MAE: warm-up epochs on pixels (WSE), tau 0.995", False),
    ("tau", lambda n: n["family"] == EMATarget.kind and n.get("wse") == 5, "EMA-MAE: per-epoch tau, WSE 5", False),
)
STAGE_TITLES = {"finetune": "fine-tune", "linprobe": "linear probe"}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _empty(ax, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves(row: dict, stage: str, key: str = "test_acc1"):
    """Per-epoch mean and std over seeds of log[key]."""
    per_seed = [[r.get(key) for r in st[stage]["log"]] for st in row["seeds"].values() if stage in st]
    per_seed = [c for c in per_seed if c]
    if not per_seed:
        return None
    n = max(len(c) for c in per_seed)
    mean, std = [], []
    for e in range(n):
        s = mean_std([c[e] for c in per_seed if e < len(c) and c[e] is not None])
        mean.append(s[0] if s else float("nan"))
        std.append(s[1] if s else 0.0)
    return list(range(n)), mean, std


def _best_of_family(rows: Dict[str, dict], stage: str) -> Dict[str, str]:
    """{family: its row with the highest mean best acc@1}; families: scratch, then every target kind."""
    out: Dict[str, str] = {}
    for fam in (SCRATCH, *TARGETS):
        scored = [(summarize(r, stage)["best"], name) for name, r in rows.items() if r["family"] == fam]
        scored = [(s[0], name) for s, name in scored if s is not None]
        if scored:
            out[fam] = max(scored)[1]
    return out


def plot_curves(rows: Dict[str, dict], stage: str, path: str) -> None:
    """Test acc@1 per epoch of the best row of each family, mean +- std over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    best = _best_of_family(rows, stage)
    for fam, name in best.items():
        c = _curves(rows[name], stage)
        if c is None:
            continue
        x, m, sd = c
        line, = ax.plot(x, m, label=f"{fam}: {name}")
        if any(sd):
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=line.get_color(), alpha=0.2)
    if not best:
        _empty(ax, f"no {stage} runs")
    else:
        ax.legend(fontsize=8)
    ax.set(xlabel="epoch", ylabel="test acc@1 (%)",
           title=f"{STAGE_TITLES[stage].capitalize()}: best row of each family (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _sweep_panel(ax, rows, chosen, stage: str, numbers: Dict[str, list], baseline: Optional[str],
                 log_x: bool) -> None:
    """One stage's panel of a sweep: ours with error bars, the report's numbers, the baseline."""
    col = 0 if stage == "finetune" else 1
    pts = [(x, summarize(rows[name], stage)["best"], name) for x, name in chosen]
    pts = [(x, s, name) for x, s, name in pts if s is not None]
    if not pts:
        _empty(ax, "no runs of this sweep")
        return
    xs = [p[0] for p in pts]
    ax.errorbar(xs, [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3,
                label="ours (best acc@1)")
    for x, _, name in pts:
        ref = (numbers.get(name) or [None, None])[col]
        if ref is not None:
            ax.scatter([x], [float(ref.lstrip("~"))], marker="x", color="black", zorder=3)
    ax.scatter([], [], marker="x", color="black", label="report")
    base = summarize(rows[baseline], stage)["best"] if baseline in rows else None
    if base:
        ax.axhline(base[0], ls="--", color="grey", label=f"{baseline} (baseline)")
    if log_x and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.legend(fontsize=7)


def plot_sweep(rows: Dict[str, dict], param: str, select: Callable[[dict], bool], path: str, title: str,
               numbers: Dict[str, list], baseline: Optional[str], log_x: bool = False) -> None:
    """best acc@1 vs a row parameter, fine-tune and probe side by side; the baseline row dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    chosen = sorted((r["nominal"][param], name) for name, r in rows.items()
                    if param in r["nominal"] and select(r["nominal"]))
    for ax, stage in zip(axes, STAGE_TITLES):
        _sweep_panel(ax, rows, chosen, stage, numbers, baseline, log_x)
        ax.set(xlabel=param, ylabel="best test acc@1 (%)", title=STAGE_TITLES[stage])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(plt, fig, path)


def plot_pretrain_loss(rows: Dict[str, dict], path: str) -> None:
    """Seed-0 pretraining loss per epoch, one line per row, target refreshes marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    logs = {name: first_seed(row).get("pretrain", {}).get("log") for name, row in rows.items()}
    logs = {name: log for name, log in logs.items() if log}
    refresh_label = True
    for name, log in logs.items():
        line, = ax.plot([r["epoch"] for r in log], [r.get("loss") for r in log], label=name, lw=1.2)
        ref = [(r["epoch"], r.get("loss")) for r in log if r.get("target_refreshed")]
        if ref:
            ax.scatter([e for e, _ in ref], [v for _, v in ref], marker="v", color=line.get_color(), zorder=3,
                       label="target refreshed" if refresh_label else None)
            refresh_label = False
    if logs:
        if all(r.get("loss", 1) > 0 for log in logs.values() for r in log):
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty(ax, "no pretraining runs")
    ax.set(xlabel="epoch", ylabel="pretraining loss (pixel or feature MSE)",
           title="Pretraining loss (seed 0); triangles: target encoder refreshed/created")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
