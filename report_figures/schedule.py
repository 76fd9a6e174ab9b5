"""The schedule-length plan (reproduce.py --plan schedule, issue 16 section 1): the study's rows at
several pretraining budgets, compared with pixel MAE at the same budget, at equal wall-clock and at
equal FLOPs.

scale_to_budget is the one rule that turns a row written for the study's 8 epochs into a budget
of B epochs; reproduce.py passes its values as flags, so `--dry_run` shows them.

Reads RUNS/ROW/budgetB/seedS/{pretrain,linprobe,finetune}/ (as written by reproduce.py) and writes into OUT:
    schedule_results.md    per row and budget: probe best acc@1 and kNN acc (mean +- std over
                           seeds), the paired differences to pixel at the same budget and seed, the
                           pretraining wall-clock and FLOPs, their ratios to pixel's, and the
                           differences to pixel at equal wall-clock / FLOPs (pixel interpolated
                           over its budgets); the short fine-tuning's column where there is one
    schedule_results.json  the same numbers, machine-readable
    schedule.png           difference to pixel (probe, kNN) against the budget, one line per row
                           (dotted: at equal FLOPs)
"""
import json
import math
import os
from typing import Dict, List, Optional

from report_figures.runs import mean_std
from report_figures.study import COST, DELTAS, FLOPS, cell, collect_study, finetune_columns, references
from util.runfiles import read_log, read_yaml

# Options counted in epochs: scaled linearly with the budget. A new epoch-counted option of a row
# (e.g. a stage length) must be added here, or it keeps its 8-epoch value at every budget.
EPOCH_OPTIONS = ("warmup_epochs", "wse", "k", "feature_ramp")
# EMA decays (per epoch, or per step with ema_every: step): scaled as tau ** (base / B).
DECAY_OPTIONS = ("tau", "tau_end")
NAMES = {"best_acc1": "probe", "knn_acc": "kNN"}


def budget_dir(budget: int) -> str:
    """A budget's folder between ROW and seedS: RUNS/ROW/budgetB/seedS."""
    return f"budget{budget}"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_to_budget(options: Dict[str, object], budget: int, base: Dict[str, object]) -> Dict[str, object]:
    """The pretraining values of one row at a budget of `budget` epochs.

    options: the row's pretrain options (configs/schedule/ROW.yaml), written for the recipe `base`
    (report_figures.recipe.STUDY_RECIPE["pretrain"]: base["epochs"] = 8 epochs, 2 of them warm-up).
    - epochs: the budget.
    - EPOCH_OPTIONS (the row's value, else the recipe's): value * B / 8, rounded half up, at least 1
      (0 stays 0). Budget 32: warm-up 8, wse 8, k 8, feature_ramp 8.
    - DECAY_OPTIONS (the row's tau / tau_end): tau ** (8 / B). The EMA then forgets at the same
      pace per fraction of the budget: after a fraction f of training, tau_B ** (f B) = tau ** (8 f),
      so its horizon in epochs is the same fraction of the budget at every B. The study's per-epoch
      0.9 over 8 epochs (0.9**8 = 0.43 left after a whole run; the report: 0.995 over 200 epochs,
      0.995**200 = 0.37) becomes 0.9**0.25 = 0.974 at 32 epochs and 0.9**(1/12) = 0.991 at 96. A
      per-step tau (ema_every: step) gets the same rule: the steps per epoch do not change.
    """
    base_epochs = int(base["epochs"])
    out: Dict[str, object] = {"epochs": budget}
    for key in EPOCH_OPTIONS:
        value = options.get(key, base.get(key))
        if value is not None:
            out[key] = 0 if int(value) == 0 else max(1, _round_half_up(int(value) * budget / base_epochs))
    for key in DECAY_OPTIONS:
        if options.get(key) is not None:
            out[key] = float(options[key]) ** (base_epochs / budget)
    return out


# ---- compute-matched comparison -------------------------------------------------------------
def budget_at_cost(cost: Dict[int, float], seconds: float) -> Optional[float]:
    """The reference's budget whose pretraining wall-clock is `seconds`, from its measured
    {budget: seconds}: log-budget linear in log-seconds between the two measured points around it;
    beyond them, proportional to the nearest one (a fixed cost per epoch). None without data."""
    pts = sorted((s, b) for b, s in cost.items() if s is not None and s > 0)
    if not pts or seconds is None or seconds <= 0:
        return None
    if seconds <= pts[0][0] or seconds >= pts[-1][0] or len(pts) == 1:
        s0, b0 = pts[0] if seconds <= pts[0][0] else pts[-1]
        return b0 * seconds / s0
    for (s0, b0), (s1, b1) in zip(pts, pts[1:]):
        if s0 <= seconds <= s1:
            t = math.log(seconds / s0) / math.log(s1 / s0) if s1 > s0 else 0.0
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def interp_log_budget(values: Dict[int, float], budget: Optional[float]) -> Optional[float]:
    """A value measured at some budgets, at `budget`: linear in log(budget) between the two measured
    budgets around it. None outside the measured range (never extrapolated) or without data."""
    pts = sorted((b, v) for b, v in values.items() if v is not None)
    if budget is None or not pts:
        return None
    eps = 1e-9 * budget
    for b, v in pts:
        if abs(b - budget) <= eps:
            return v
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if b0 < budget < b1:
            t = math.log(budget / b0) / math.log(b1 / b0)
            return v0 + t * (v1 - v0)
    return None


def _mean(st: Optional[tuple]) -> Optional[float]:
    return st[0] if st else None


def _equal_cost(row: dict, at_budget: Dict[int, dict], ref: str, budget: int, cost: str = COST,
                ratio: str = "cost_ratio", eq: str = "eq") -> None:
    """Add to one row-at-a-budget (collect_study's stats) the comparison with the reference at equal
    `cost` (COST: wall-clock seconds; FLOPS: pretraining FLOPs): RATIO (its mean cost / the
    reference's at the same budget), EQ_budget (the reference budget of equal cost), EQ_METRIC (the
    reference there, interpolated per seed) and d_EQ_METRIC (row - reference there, paired over seeds)."""
    ref_cost = {b: _mean(st[ref].get(cost)) for b, st in at_budget.items() if st.get(ref)}
    own, same = _mean(row.get(cost)), ref_cost.get(budget)
    row[ratio] = own / same if own and same else None
    row[f"{eq}_budget"] = at = budget_at_cost(ref_cost, own) if own else None
    ref_seeds = {b: st[ref]["seeds"] for b, st in at_budget.items() if st.get(ref)}
    seeds = sorted({s for per in ref_seeds.values() for s in per})
    for k in DELTAS:
        at_eq = {s: interp_log_budget({b: per[s].get(k) for b, per in ref_seeds.items() if s in per}, at)
                 for s in seeds}
        row[f"{eq}_{k}"] = mean_std(list(at_eq.values()))
        row[f"d_{eq}_{k}"] = mean_std([v[k] - at_eq[s] for s, v in row["seeds"].items()
                                       if k in v and at_eq.get(s) is not None])


def add_flops(stats: Dict[str, dict], runs_root: str, budget: int) -> None:
    """Each run's pretraining FLOPs (report_figures.flops) into collect_study's stats of one budget (its
    seeds' files were read, and found well-formed, by collect_study)."""
    from report_figures.flops import pretrain_flops  # here: it builds models (torch); a dry run needs none
    for name, row in stats.items():
        for seed, vals in row["seeds"].items():
            d = os.path.join(runs_root, name, budget_dir(budget), f"seed{seed}", "pretrain")
            config, log = read_yaml(os.path.join(d, "config.yaml")), read_log(os.path.join(d, "log.txt"))
            flops = pretrain_flops(config, log) if config and log else None
            if flops is not None:
                vals[FLOPS] = flops
        row[FLOPS] = mean_std([v.get(FLOPS) for v in row["seeds"].values()])


def measured_budgets(runs_root: str, name: str) -> List[int]:
    """The budgets B with a folder RUNS/NAME/budgetB, in increasing order."""
    d = os.path.join(runs_root, name)
    found = os.listdir(d) if os.path.isdir(d) else []
    return sorted(int(f[len("budget"):]) for f in found if f.startswith("budget") and f[len("budget"):].isdigit())


def collect_schedule(runs_root: str, names: List[str], budgets: List[int], ref: str) -> Dict[str, dict]:
    """{row: {budget: stats}} for the rows and budgets asked for: collect_study's statistics of
    RUNS/ROW/budgetB (d_REF_METRIC: paired over seeds at the same budget) plus _equal_cost's. The
    equal-cost comparisons (wall-clock and FLOPs) use every budget the reference has on disk, asked
    for or not."""
    at_budget: Dict[int, dict] = {}
    for b in sorted(set(budgets) | set(measured_budgets(runs_root, ref))):
        rows = list(dict.fromkeys([ref] + (names if b in budgets else [])))
        at_budget[b] = collect_study(runs_root, rows, [ref], subdir=budget_dir(b))
        add_flops(at_budget[b], runs_root, b)
    out: Dict[str, dict] = {name: {} for name in names}
    for name in names:
        for b in budgets:
            st = at_budget[b][name]
            if name != ref:
                _equal_cost(st, at_budget, ref, b)  # wall-clock
                _equal_cost(st, at_budget, ref, b, FLOPS, "flops_ratio", "eqf")
            out[name][b] = st
    return out


# ---- table and figure -----------------------------------------------------------------------
def schedule_table(stats: Dict[str, dict], ref: str) -> str:
    """Markdown table of collect_schedule's result: a line per row and budget it has runs at (with
    the short fine-tuning's columns when a row has one)."""
    ft_head, ft_cells = finetune_columns({f"{n}@{b}": st for n, per in stats.items() for b, st in per.items()}, ref)
    head = ["row", "budget (epochs)", "seeds", "probe best acc@1", "kNN acc", f"Δ probe vs {ref}",
            f"Δ kNN vs {ref}", "pretrain min", f"wall-clock vs {ref}", f"Δ probe vs {ref} at equal wall-clock",
            f"Δ kNN vs {ref} at equal wall-clock", "pretrain TFLOP", f"FLOPs vs {ref}",
            f"{ref} epochs at equal FLOPs", f"Δ probe vs {ref} at equal FLOPs", f"Δ kNN vs {ref} at equal FLOPs"]
    head += ft_head
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, per_budget in stats.items():
        for b, st in per_budget.items():
            if not st["seeds"]:  # e.g. scratch, run at the longest budget only
                continue
            minutes = st[COST] and (st[COST][0] / 60, st[COST][1] / 60, st[COST][2])
            tflop = st.get(FLOPS) and (st[FLOPS][0] / 1e12, st[FLOPS][1] / 1e12, st[FLOPS][2])
            cells = [name, str(b), str(len(st["seeds"])), cell(st["best_acc1"]), cell(st["knn_acc"]),
                     cell(st.get(f"d_{ref}_best_acc1"), True), cell(st.get(f"d_{ref}_knn_acc"), True),
                     cell(minutes), _ratio(st.get("cost_ratio")), cell(st.get("d_eq_best_acc1"), True),
                     cell(st.get("d_eq_knn_acc"), True), cell(tflop), _ratio(st.get("flops_ratio")),
                     f"{st['eqf_budget']:.1f}" if st.get("eqf_budget") else "-",
                     cell(st.get("d_eqf_best_acc1"), True), cell(st.get("d_eqf_knn_acc"), True)] + ft_cells(st)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(x: Optional[float]) -> str:
    return f"{x:.2f}×" if x else "-"


NOTES = """Accuracies in %, mean ± std over seeds. Δ vs {ref}: paired over seeds (same budget, same seed:
the seed fixes initialisation, data order and masks), mean ± std of the per-seed differences.
*pretrain min*: pretraining wall-clock (sum of the epochs' `seconds` in pretrain/log.txt: the
training loop, without start-up and the probe); it depends on what else the machine ran at the
time. *pretrain TFLOP*: pretraining compute counted by torch.utils.flop_counter on the engine's own
step (report_figures/flops.py: matmuls and convolutions, forward + backward, target pass included),
independent of the machine. *vs {ref}*: the ratio to {ref}'s at the same budget. *{ref} epochs at
equal FLOPs*: the {ref} budget of the same compute. *Δ at equal wall-clock / FLOPs*: the row minus
{ref} at the budget of the same cost, an **interpolation**, not a run: {ref}'s probe / kNN linear in
log-budget between its two measured budgets around it, per seed (Δ paired over seeds); '-' outside
{ref}'s measured budgets (not extrapolated: run {ref} at a longer budget to cover it).
*fine-tune acc@1*: the short fine-tuning of plan.yaml's finetune_rows
(report_figures.recipe.STUDY_RECIPE["finetune"], the same for every row), run at the longest budget:
last-epoch test acc@1, Δ paired over seeds.
"""


def plotted_budgets(stats: Dict[str, dict], ref: str) -> List[int]:
    """The budgets at which some row has a Δ vs ref to plot (the figure's x ticks): a budget only
    the reference was run at (pixel at 64, for the equal-FLOPs interpolation) adds no point."""
    return sorted({b for name, per in stats.items() if name != ref
                   for b, st in per.items() if st.get(f"d_{ref}_{DELTAS[0]}")})


def plot_schedule(stats: Dict[str, dict], path: str, ref: str) -> None:
    """Two panels (probe, kNN): Δ vs ref against the budget (log x), a line per row, error bars =
    paired std over seeds; dotted, same colour: Δ vs ref at equal FLOPs (interpolated)."""
    from report_figures.plots import pyplot  # here: report_figures.plots imports torch, the dry run needs none
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    # rows without pretraining (scratch: tens of points below) would squash the axis; the table has them
    names = [n for n in stats if n != ref and any(st.get(COST) for st in stats[n].values())]
    budgets = plotted_budgets(stats, ref)
    cmap = plt.get_cmap("tab10")
    for ax, k in zip(axes, DELTAS):
        ax.axhline(0.0, color="black", lw=1, label=f"{ref} (same budget)")
        for i, name in enumerate(names):
            jitter = math.exp(0.025 * (i - (len(names) - 1) / 2))  # keep error bars apart
            pts = [(b * jitter, st[f"d_{ref}_{k}"]) for b, st in stats[name].items() if st.get(f"d_{ref}_{k}")]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                            color=cmap(i % 10), marker="o", capsize=3, label=name)
            eq = [(b * jitter, st[f"d_eqf_{k}"][0]) for b, st in stats[name].items() if st.get(f"d_eqf_{k}")]
            if eq:
                ax.plot([p[0] for p in eq], [p[1] for p in eq], color=cmap(i % 10), ls=":", marker="x")
        ax.set_xscale("log")
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        ax.set_xlabel("pretraining budget (epochs)")
        ax.set_title(f"Δ {'linear probe acc@1' if k == 'best_acc1' else 'kNN acc'} vs {ref} (% points)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(axes[0].plot([], [], color="grey", ls=":", marker="x")[0])
    labels.append(f"dotted: vs {ref} at equal FLOPs (interpolated)")
    fig.suptitle(f"Difference to {ref} at the same budget; error bars: std of the paired per-seed differences",
                 fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_schedule(runs_root: str, names: List[str], budgets: List[int], out_dir: str,
                   plan: str = "schedule") -> List[str]:
    """Write schedule_results.md/.json and schedule.png into OUT_DIR (rows compared with the plan's
    first reference); returns their paths."""
    ref = references(plan)[0]
    stats = collect_schedule(runs_root, names, budgets, ref)
    os.makedirs(out_dir, exist_ok=True)
    md, js, png = (os.path.join(out_dir, f) for f in ("schedule_results.md", "schedule_results.json",
                                                        "schedule.png"))
    measured = measured_budgets(runs_root, ref)
    with open(md, "w") as f:
        f.write(f"# Schedule results ({os.path.basename(os.path.normpath(runs_root))})\n\n"
                + NOTES.format(ref=ref) + f"\n{ref}'s budgets on disk (the interpolation's points): "
                + (", ".join(map(str, measured)) or "none") + ".\n\n"
                + schedule_table(stats, ref) + "\n![schedule](schedule.png)\n")
    with open(js, "w") as f:
        json.dump({"reference": ref, "budgets": budgets, "reference_budgets": measured, "rows": stats}, f,
                  indent=2)
    plot_schedule(stats, png, ref)
    return [md, js, png]
