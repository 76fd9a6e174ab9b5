"""Figures and results table of the report reproduction, from run directories only.

    python report_figures/make_figures.py --runs output/report [--out report_figures] [--no_models]

Reads RUNS/NAME/seedS/{pretrain,finetune,linprobe}/ (log.txt, results.json, config.yaml) as
written by reproduce.py and writes into OUT:
    finetune_curves.png   fine-tune test acc@1 per epoch, best row of each family
    linprobe_curves.png   linear-probe test acc@1 per epoch, best row of each family
    sweep_k.png           best acc@1 vs K (MAE-K), fine-tune and probe
    sweep_wse.png         best acc@1 vs WSE (EMA, tau 0.995)
    sweep_tau.png         best acc@1 vs tau (EMA, WSE 5)
    pretrain_loss.png     pretraining loss per epoch, target refreshes marked
    results.md            every row: best/last acc (mean +- std over seeds), the report's number, command
    results.json          the same numbers, machine-readable
and, unless --no_models, from each row's seed-0 pretraining checkpoint:
    recon_NAME.png        original / masked / reconstruction / reconstruction + visible (pixel head)
    featsim_NAME.png      per-patch cosine similarity, target-encoder features vs feature-head prediction
"""
import glob
import json
import math
import os
from typing import Dict, List, Optional

import yaml

STAGES = ("pretrain", "finetune", "linprobe")
FAMILIES = ("scratch", "pixel", "mae_k", "ema")

# REFERENCE.md section 2, CIFAR-10 test accuracy (%): (fine-tune, linear probe); None = not reported.
# Strings keep the report's "~" (approximate, read off a plot).
REPORT_NUMBERS: Dict[str, tuple] = {
    "scratch": ("81.1", "30.9"),
    "pixel": ("85.8", "52.4"),
    "mae_k1": ("~89.4", "~51"),
    "mae_k2": ("~89.9", "~51"),
    "mae_k4": ("~90.9", "~54"),
    "mae_k10": ("91.4", "~57"),
    "mae_k20": ("~91", "57.2"),
    "ema_wse0": (None, None),
    "ema_wse1": (None, "60.5"),
    "ema_wse5": (None, None),
    "ema_wse20": (None, None),
    "ema_wse40": (None, None),
    "ema_wse80": (None, None),
    "ema_tau0.9_wse5": ("91.3", None),
    "ema_tau0.7_wse5": (None, None),
}

# The nominal parameters of each plan row (the sweeps' x axes; at smoke scale the run's own
# k / wse are capped, results.md shows what actually ran).
NOMINAL: Dict[str, dict] = {
    "scratch": {"family": "scratch"},
    "pixel": {"family": "pixel"},
    **{f"mae_k{k}": {"family": "mae_k", "k": k} for k in (1, 2, 4, 10, 20)},
    **{f"ema_wse{w}": {"family": "ema", "wse": w, "tau": 0.995} for w in (0, 1, 5, 20, 40, 80)},
    "ema_tau0.9_wse5": {"family": "ema", "wse": 5, "tau": 0.9},
    "ema_tau0.7_wse5": {"family": "ema", "wse": 5, "tau": 0.7},
}

FIGURES = ("finetune_curves.png", "linprobe_curves.png", "sweep_k.png", "sweep_wse.png", "sweep_tau.png",
           "pretrain_loss.png")


# ---- reading run directories ----------------------------------------------------------------

def read_log(path: str) -> List[dict]:
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return out


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_yaml(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def _seed_of(path: str) -> int:
    tail = os.path.basename(path)[len("seed"):]
    return int(tail) if tail.isdigit() else 0


def collect(runs_root: str) -> Dict[str, dict]:
    """{row name: {"seeds": {seed: {stage: {"log", "results", "config", "dir"}}}, "commands", "family", ...}}."""
    rows: Dict[str, dict] = {}
    for row_dir in sorted(glob.glob(os.path.join(runs_root, "*"))):
        seed_dirs = sorted(glob.glob(os.path.join(row_dir, "seed*")), key=_seed_of)
        if not os.path.isdir(row_dir) or not seed_dirs:
            continue
        name = os.path.basename(row_dir)
        row = {"name": name, "seeds": {}, "commands": None}
        for sd in seed_dirs:
            stages = {}
            for st in STAGES:
                d = os.path.join(sd, st)
                if os.path.isdir(d):
                    stages[st] = {"dir": d, "log": read_log(os.path.join(d, "log.txt")),
                                  "results": read_json(os.path.join(d, "results.json")),
                                  "config": _read_yaml(os.path.join(d, "config.yaml")) or {}}
            if stages:
                row["seeds"][_seed_of(sd)] = stages
            if row["commands"] is None:
                row["commands"] = read_json(os.path.join(sd, "commands.json"))
        if not row["seeds"]:
            continue
        first = row["seeds"][min(row["seeds"])]
        pcfg = first.get("pretrain", {}).get("config") or {}
        row["family"] = pcfg.get("target") if pcfg else NOMINAL.get(name, {}).get("family", "scratch")
        row["pretrain_config"] = pcfg
        row["nominal"] = NOMINAL.get(name, {})
        rows[name] = row
    order = list(NOMINAL)
    return dict(sorted(rows.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                                     kv[0])))


def mean_std(values: List[Optional[float]]) -> Optional[tuple]:
    """(mean, sample std, n) of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd, len(values)


def summarize(row: dict, stage: str) -> Dict[str, Optional[tuple]]:
    """mean/std/n over seeds of best and last acc@1 (finished runs: results.json; else log.txt)."""
    best, last = [], []
    for stages in row["seeds"].values():
        st = stages.get(stage)
        if not st:
            continue
        if st["results"]:
            best.append(st["results"].get("best_acc1"))
            last.append(st["results"].get("last_acc1"))
        elif st["log"]:
            best.append(st["log"][-1].get("best_acc1"))
            last.append(st["log"][-1].get("test_acc1"))
    return {"best": mean_std(best), "last": mean_std(last)}


def _fmt(s: Optional[tuple]) -> str:
    if s is None:
        return "-"
    m, sd, n = s
    return f"{m:.2f} +- {sd:.2f} (n={n})" if n > 1 else f"{m:.2f}"


# ---- plots ---------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _empty(ax, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")


def _curves(row: dict, stage: str, key: str = "test_acc1"):
    """Per-epoch mean and std over seeds of log[key]."""
    per_seed = [[r.get(key) for r in st[stage]["log"]] for st in row["seeds"].values() if stage in st]
    per_seed = [c for c in per_seed if c]
    if not per_seed:
        return None
    n = max(len(c) for c in per_seed)
    mean, std = [], []
    for e in range(n):
        vals = [c[e] for c in per_seed if e < len(c) and c[e] is not None]
        s = mean_std(vals)
        mean.append(s[0] if s else float("nan"))
        std.append(s[1] if s else 0.0)
    return list(range(n)), mean, std


def _best_of_family(rows: Dict[str, dict], stage: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for fam in FAMILIES:
        scored = [(summarize(r, stage)["best"], name) for name, r in rows.items() if r["family"] == fam]
        scored = [(s[0], name) for s, name in scored if s is not None]
        if scored:
            out[fam] = max(scored)[1]
    return out


def plot_curves(rows: Dict[str, dict], stage: str, path: str) -> None:
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
    ax.set_xlabel("epoch")
    ax.set_ylabel("test acc@1 (%)")
    ax.set_title(f"{'Fine-tuning' if stage == 'finetune' else 'Linear probe'}: best row of each family"
                 " (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: Dict[str, dict], param: str, select, path: str, title: str, log_x: bool = False) -> None:
    """best acc@1 vs a row parameter, fine-tune and probe side by side; pixel MAE as a dashed line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    chosen = sorted(((r["nominal"][param], name) for name, r in rows.items()
                     if param in r["nominal"] and select(r["nominal"])))
    for ax, stage in zip(axes, ("finetune", "linprobe")):
        pts = [(x, summarize(rows[name], stage)["best"], name) for x, name in chosen]
        pts = [(x, s, name) for x, s, name in pts if s is not None]
        if pts:
            xs = [p[0] for p in pts]
            ax.errorbar(xs, [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3,
                        label="ours (best acc@1)")
            for x, s, name in pts:
                ref = REPORT_NUMBERS.get(name, (None, None))[0 if stage == "finetune" else 1]
                if ref is not None:
                    ax.scatter([x], [float(ref.lstrip("~"))], marker="x", color="black", zorder=3)
            ax.scatter([], [], marker="x", color="black", label="report")
            if "pixel" in rows and summarize(rows["pixel"], stage)["best"]:
                ax.axhline(summarize(rows["pixel"], stage)["best"][0], ls="--", color="grey", label="pixel MAE")
            if log_x and min(xs) > 0:
                ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.legend(fontsize=7)
        else:
            _empty(ax, "no runs of this sweep")
        ax.set_xlabel(param)
        ax.set_ylabel("best test acc@1 (%)")
        ax.set_title("fine-tune" if stage == "finetune" else "linear probe")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pretrain_loss(rows: Dict[str, dict], path: str) -> None:
    """Seed-0 pretraining loss per epoch, one line per row, target refreshes marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_line, refresh_label = False, True
    for name, row in rows.items():
        st = row["seeds"][min(row["seeds"])].get("pretrain")
        if not st or not st["log"]:
            continue
        ep = [r["epoch"] for r in st["log"]]
        loss = [r.get("loss") for r in st["log"]]
        line, = ax.plot(ep, loss, label=name, lw=1.2)
        ref = [(r["epoch"], r.get("loss")) for r in st["log"] if r.get("target_refreshed")]
        if ref:
            ax.scatter([e for e, _ in ref], [v for _, v in ref], marker="v", color=line.get_color(), zorder=3,
                       label="target refreshed" if refresh_label else None)
            refresh_label = False
        any_line = True
    if any_line:
        positive = all(r.get("loss", 1) > 0 for row in rows.values()
                       for r in row["seeds"][min(row["seeds"])].get("pretrain", {}).get("log", []))
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty(ax, "no pretraining runs")
    ax.set_xlabel("epoch")
    ax.set_ylabel("pretraining loss (pixel or feature MSE)")
    ax.set_title("Pretraining loss (seed 0); triangles: target encoder refreshed/created")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- results table ---------------------------------------------------------------------------

def _pretrain_desc(row: dict) -> str:
    c = row["pretrain_config"]
    if not c:
        return "none (random init)"
    extra = {"mae_k": f" k={c.get('k')}", "ema": f" wse={c.get('wse')} tau={c.get('tau')} ({c.get('ema_every')})"}
    return f"{c.get('target')}{extra.get(c.get('target'), '')}, {c.get('epochs')} ep, {c.get('model')}"


def write_results(rows: Dict[str, dict], out_dir: str) -> List[str]:
    lines = ["# Reproduction of the report's table (REFERENCE.md section 2)", "",
             "CIFAR-10 test accuracy (%). *best*: highest acc@1 over the evaluation epochs; *last*: the final "
             "epoch. Mean +- sample std over seeds when several (n = seeds). *report*: the number in the "
             "report (~: approximate). Generated by util/figures.py from the run directories only.", "",
             "| row | pretraining (as run) | seeds | fine-tune best | fine-tune last | report FT | "
             "probe best | probe last | report LP | eval epochs (FT/LP) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, row in rows.items():
        ft, lp = summarize(row, "finetune"), summarize(row, "linprobe")
        ref = REPORT_NUMBERS.get(name, (None, None))
        first = row["seeds"][min(row["seeds"])]
        ep = "/".join(str((first.get(s, {}).get("config") or {}).get("epochs", "-")) for s in ("finetune", "linprobe"))
        lines.append(f"| {name} | {_pretrain_desc(row)} | {len(row['seeds'])} | {_fmt(ft['best'])} | "
                     f"{_fmt(ft['last'])} | {ref[0] or '-'} | {_fmt(lp['best'])} | {_fmt(lp['last'])} | "
                     f"{ref[1] or '-'} | {ep} |")
        summary[name] = {"family": row["family"], "seeds": sorted(row["seeds"]),
                         "finetune": ft, "linprobe": lp, "report": {"finetune": ref[0], "linprobe": ref[1]},
                         "commands": row["commands"]}
    lines += ["", "## Commands", "",
              "Run from the repository root. `reproduce.py` runs the stages below for seeds 0..N-1 "
              "(`--seed S`, output under `seedS/`); shown for seed 0.", ""]
    for name, row in rows.items():
        cmds = row["commands"] or {}
        lines.append(f"### {name}")
        lines.append("")
        lines.append("```")
        if cmds.get("reproduce"):
            lines.append(cmds["reproduce"])
        for st in STAGES:
            if cmds.get(st):
                lines.append(f"  # {st}: {cmds[st]}")
        if not cmds:
            lines.append("(no commands.json: not produced by reproduce.py)")
        lines.append("```")
        lines.append("")
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    js = os.path.join(out_dir, "results.json")
    with open(js, "w") as f:
        json.dump(summary, f, indent=2)
    return [md, js]


# ---- model pictures --------------------------------------------------------------------------

def _load_pretrain(ckpt_path: str):
    import torch
    from models_mae import create_model
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = create_model(cfg["model"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    target = None
    if ckpt.get("target") is not None:
        import copy
        target = copy.deepcopy(model.encoder)
        target.load_state_dict(ckpt["target"])
        target.eval()
    return model, target, cfg


def _test_images(cfg: dict, n: int):
    import torch
    from dataio.datasets import dataset_stats, load_dataset
    images, _, _ = load_dataset(cfg.get("dataset", "cifar10"), cfg["data_path"], train=False, download=False)
    mean, std = dataset_stats(cfg.get("dataset", "cifar10"))
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s, m, s


def reconstruction_figure(ckpt_path: str, out_path: str, n: int = 8, seed: int = 0) -> None:
    """Original / masked / reconstruction / reconstruction with visible patches, n test images."""
    import torch
    plt = pyplot()
    model, _, cfg = _load_pretrain(ckpt_path)
    imgs, m, s = _test_images(cfg, n)
    torch.manual_seed(seed)
    with torch.no_grad():
        preds, mask = model(imgs, cfg.get("mask_ratio", 0.75), heads=("pixel", "feature"))
        pred = preds["pixel"]
        if cfg.get("norm_pix_loss"):
            target = model.patchify(imgs)
            mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mu
        rec = model.unpatchify(pred)
        pmask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 = removed
    show = lambda t: (t * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # noqa: E731
    cols = [("original", show(imgs)), ("masked", show(imgs * (1 - pmask)) * 1.0),
            ("reconstruction", show(rec)), ("reconstruction + visible", show(imgs * (1 - pmask) + rec * pmask))]
    masked = cols[1][1]
    masked[(pmask.permute(0, 2, 3, 1).numpy() > 0.5).all(-1)] = 0.5  # grey for removed patches
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(6, 1.5 * n))
    for i in range(n):
        for j, (title, arr) in enumerate(cols):
            ax = axes[i, j] if n > 1 else axes[j]
            ax.imshow(arr[i], interpolation="nearest")
            ax.axis("off")
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(ckpt_path))))}: "
                 f"pixel head, mask {cfg.get('mask_ratio')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def feature_similarity_figure(ckpt_path: str, out_path: str, n: int = 8, seed: int = 0) -> Optional[float]:
    """Per-patch cosine similarity between the target encoder's features and the feature head's
    prediction, on removed patches (visible patches grey). Returns the mean over removed patches."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    plt = pyplot()
    model, target, cfg = _load_pretrain(ckpt_path)
    if target is None:
        return None
    imgs, m, s = _test_images(cfg, n)
    torch.manual_seed(seed)
    with torch.no_grad():
        preds, mask = model(imgs, cfg.get("mask_ratio", 0.75), heads=("pixel", "feature"))
        tgt = target.forward_features(imgs)[:, 1:]
        cos = F.cosine_similarity(preds["feature"].float(), tgt.float(), dim=-1)  # (N, L)
    grid = int(cos.shape[1] ** 0.5)
    mean_cos = float((cos * mask).sum() / mask.sum())
    cos_map = cos.masked_fill(mask < 0.5, float("nan")).view(-1, grid, grid).numpy()
    show = (imgs * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    n = imgs.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.6))
    axes = np.asarray(axes).reshape(2, n)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = None
    for i in range(n):
        axes[0, i].imshow(show[i], interpolation="nearest")
        im = axes[1, i].imshow(cos_map[i], vmin=-1, vmax=1, cmap=cmap, interpolation="nearest")
        axes[1, i].set_title(f"{np.nanmean(cos_map[i]):.2f}", fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02)
    fig.suptitle(f"{os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(ckpt_path))))}: "
                 f"cos(target features, feature-head prediction) on removed patches "
                 f"(grey: visible), mean {mean_cos:.3f}", fontsize=8)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return mean_cos


# ---- everything ------------------------------------------------------------------------------

def make_all(runs_root: str, out_dir: str, models: bool = True) -> List[str]:
    """Write every figure and the results table; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    rows = collect(runs_root)
    p = lambda f: os.path.join(out_dir, f)  # noqa: E731
    plot_curves(rows, "finetune", p("finetune_curves.png"))
    plot_curves(rows, "linprobe", p("linprobe_curves.png"))
    plot_sweep(rows, "k", lambda nom: nom.get("family") == "mae_k", p("sweep_k.png"),
               "MAE-K: refresh period K", log_x=True)
    plot_sweep(rows, "wse", lambda nom: nom.get("family") == "ema" and nom.get("tau") == 0.995,
               p("sweep_wse.png"), "EMA-MAE: warm-up epochs on pixels (WSE), tau 0.995")
    plot_sweep(rows, "tau", lambda nom: nom.get("family") == "ema" and nom.get("wse") == 5,
               p("sweep_tau.png"), "EMA-MAE: per-epoch tau, WSE 5")
    plot_pretrain_loss(rows, p("pretrain_loss.png"))
    written = [p(f) for f in FIGURES] + write_results(rows, out_dir)
    if models:
        for name, row in rows.items():
            st = row["seeds"][min(row["seeds"])].get("pretrain")
            ckpt = os.path.join(st["dir"], "checkpoint-last.pth") if st else None
            if not ckpt or not os.path.isfile(ckpt):
                continue
            try:
                if row["family"] == "pixel":
                    reconstruction_figure(ckpt, p(f"recon_{name}.png"))
                    written.append(p(f"recon_{name}.png"))
                elif feature_similarity_figure(ckpt, p(f"featsim_{name}.png")) is not None:
                    written.append(p(f"featsim_{name}.png"))
            except Exception as e:  # a picture must not cost the table: say why and go on
                print(f"[figures] {name}: no model picture ({type(e).__name__}: {e})")
    return written


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Figures and results.md from reproduce.py run directories")
    ap.add_argument("--runs", default=os.path.join("output", "report"), help="OUTPUT_ROOT of reproduce.py")
    ap.add_argument("--out", default="report_figures", help="where to write the figures and results.md")
    ap.add_argument("--no_models", action="store_true", help="skip the pictures that need checkpoints")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.runs):
        raise SystemExit(f"error: no run directory {a.runs}")
    for path in make_all(a.runs, a.out, models=not a.no_models):
        print(path)
