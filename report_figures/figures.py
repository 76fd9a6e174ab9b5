"""Figures and results table of the report reproduction, from run directories only.

    python report_figures/make_figures.py --runs output/report [--out report_figures] [--no_models]
    python -m report_figures.figures --runs output/report                     (the same)

Reads RUNS/NAME/seedS/{pretrain,finetune,linprobe}/ (log.txt, results.json, config.yaml) as
written by reproduce.py (report_figures/runs.py; a seed with a malformed file is left out, said in one
line on stderr: util/runfiles.py) and writes into OUT:
    finetune_curves.png   fine-tune test acc@1 per epoch, best row of each family
    linprobe_curves.png   linear-probe test acc@1 per epoch, best row of each family
    sweep_k.png           best acc@1 vs K (MAE-K), fine-tune and probe
    sweep_wse.png         best acc@1 vs WSE (EMA, tau 0.995)
    sweep_tau.png         best acc@1 vs tau (EMA, WSE 5)
    pretrain_loss.png     pretraining loss per epoch, target refreshes marked
    results.md            every row: best/last acc (mean +- std over seeds), the report's number, command
    results.json          the same numbers, machine-readable
and, unless --no_models, from each row's seed-0 pretraining checkpoint (report_figures/model_figures.py):
    recon_NAME.png        without a target encoder: original / masked / reconstruction (pixel head)
    featsim_NAME.png      with one: per-patch cosine similarity, target vs feature-head prediction
The rows' order, the report's numbers and the baseline come from configs/report/plan.yaml.
"""
import os
from typing import List

from report_figures.model_figures import feature_similarity_figure, reconstruction_figure
from report_figures.plans import load_plan
from report_figures.plots import SWEEPS, plot_curves, plot_pretrain_loss, plot_sweep
from report_figures.runs import collect, first_seed
from report_figures.tables import write_results
from util.errors import ArgumentParser, UserError, cli

FIGURES = ("finetune_curves.png", "linprobe_curves.png", *(f"sweep_{s[0]}.png" for s in SWEEPS),
           "pretrain_loss.png")


def model_figures(rows, out_dir: str) -> List[str]:
    """recon_NAME.png or featsim_NAME.png per row with a seed-0 pretraining checkpoint."""
    written = []
    for name, row in rows.items():
        st = first_seed(row).get("pretrain")
        ckpt = os.path.join(st["dir"], "checkpoint-last.pth") if st else None
        if not ckpt or not os.path.isfile(ckpt):
            continue
        try:
            featsim = os.path.join(out_dir, f"featsim_{name}.png")
            if feature_similarity_figure(ckpt, featsim) is not None:
                written.append(featsim)
            else:  # no target encoder: the pixel head's reconstructions
                reconstruction_figure(ckpt, os.path.join(out_dir, f"recon_{name}.png"))
                written.append(os.path.join(out_dir, f"recon_{name}.png"))
        except Exception as e:  # a picture must not cost the table: say why and go on
            print(f"[figures] {name}: no model picture ({type(e).__name__}: {e})")
    return written


def make_all(runs_root: str, out_dir: str, models: bool = True) -> List[str]:
    """Write every figure and the results table; returns the paths written. No run to read is a
    UserError."""
    rows = collect(runs_root, "report")
    if not rows:
        raise UserError(f"no runs in {runs_root} (RUNS/NAME/seedS/{{pretrain,finetune,linprobe}}/, as "
                        f"reproduce.py writes them)")
    os.makedirs(out_dir, exist_ok=True)
    plan = load_plan("report")
    numbers, baseline = plan.get("report_numbers") or {}, plan.get("baseline")
    p = lambda f: os.path.join(out_dir, f)  # noqa: E731
    plot_curves(rows, "finetune", p("finetune_curves.png"))
    plot_curves(rows, "linprobe", p("linprobe_curves.png"))
    for param, select, title, log_x in SWEEPS:
        plot_sweep(rows, param, select, p(f"sweep_{param}.png"), title, numbers, baseline, log_x)
    plot_pretrain_loss(rows, p("pretrain_loss.png"))
    written = [p(f) for f in FIGURES] + write_results(rows, out_dir, numbers)
    return written + (model_figures(rows, out_dir) if models else [])


@cli
def main(argv=None) -> None:
    ap = ArgumentParser(description="Figures and results.md from reproduce.py run directories")
    ap.add_argument("--runs", default=os.path.join("output", "report"), help="OUTPUT_ROOT of reproduce.py")
    ap.add_argument("--out", default="report_figures", help="where to write the figures and results.md")
    ap.add_argument("--no_models", action="store_true", help="skip the pictures that need checkpoints")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.runs):
        raise UserError(f"no run directory {a.runs}")
    for path in make_all(a.runs, a.out, models=not a.no_models):
        print(path)


if __name__ == "__main__":
    main()
