"""Reproduce the report's table (REFERENCE.md section 2): pretrain -> fine-tune -> linear probe per row.

    python reproduce.py --plan report                        # every row, 1 seed, the report's recipe
    python reproduce.py --plan report --only pixel mae_k10 --seeds 3
    python reproduce.py --plan report --dry_run              # print the exact commands, run nothing
    python reproduce.py --plan report --scale smoke --data_path /tmp/fake   # tiny model, 2 epochs, CPU

Each row is configs/report/NAME.yaml (only what the row varies; the rest is the scripts'
defaults), in the order of configs/report/plan.yaml. For every row and seed the three stages run one after the other as subprocesses
of main_pretrain.py, main_finetune.py and main_linprobe.py, writing

    OUTPUT_ROOT/NAME/seedS/{pretrain,finetune,linprobe}/   (log.txt, config.yaml, checkpoints, results.json)
    OUTPUT_ROOT/NAME/seedS/{stage}.out                       (the stage's console output)
    OUTPUT_ROOT/NAME/seedS/commands.json                     (the exact command of each stage)

A stage whose run is complete (pretrain: log.txt reached the configured epochs; fine-tune /
probe: results.json with the configured epochs) is skipped; any other stage is simply rerun
with the same command, and the scripts resume from their checkpoint-last.pth. A run file that is
malformed (util/runfiles.py) fails that row and seed in one line. At the end the figures and
results.md are written (report_figures/figures.py) into report_figures/ (or --figures_dir).

SIGTERM / SIGINT (kill, Ctrl-C, or the whole process group: scancel, `timeout`, systemd) are
passed on to the running stage, which saves its checkpoint and exits; reproduce.py then exits
128 + the signal's number without starting another stage. Rerun the same command to continue.

    python reproduce.py --plan study --seeds 3               # the improvement study (docs/RESULTS.md)

The study plan (configs/study/NAME.yaml, ordered by configs/study/plan.yaml) runs pretrain -> linear probe on cached features + kNN
on Fashion-MNIST with a small model and a 6,000-image training subset, about 30 min for 3 seeds on
2 CPU cores; its table and figure (report_figures/study.py) go to OUTPUT_ROOT (or --figures_dir).

    python reproduce.py --plan schedule --seeds 3 --budgets 8 32 96   # issue 16: when do targets pay?

The schedule plan runs the study's recipe for its rows (configs/schedule/) at every pretraining
budget, into OUTPUT_ROOT/NAME/budgetB/seedS/{pretrain,linprobe[,finetune]}/, the epoch-counted options and tau
scaled by report_figures.schedule.scale_to_budget (the scaled values are flags, shown by --dry_run); the
rows of plan.yaml's finetune_rows are also fine-tuned briefly at the longest budget, and a row
without pretraining (scratch) runs once, at the longest budget. Its table (paired deltas vs pixel,
and vs pixel at equal counted FLOPs and at equal wall-clock) and figure (report_figures/schedule.py) go
to OUTPUT_ROOT. --model swaps the study's smoke model for another registered MAE model (default
output root then output/PLAN-MODEL).
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from report_figures.plans import (PLAN_NAMES, ROOT, plan_dir, plan_finetune_rows, plan_rows, row_config,
                                  uses_study_recipe)
from report_figures.recipe import (STAGES, STUDY_DATA, STUDY_STAGES, check_study_flags, run_dir, shared_flags,
                                   stage_command)
from report_figures.recipe import flags as _flags
from util.errors import ArgumentParser, UserError, cli
from util.runfiles import BadRunFile, read_json, read_log
from util.signals import STOP_SIGNALS


# Each plan's rows in table order (configs/PLAN/plan.yaml): the report's table, and the plans with
# the study recipe (report_figures/recipe.py: pretrain -> cached-feature linear probe + kNN only, on a
# small Fashion-MNIST recipe that fits a 2-core CPU): the improvement study, the ablation and the
# schedule-length plan.
PLANS: Dict[str, List[str]] = {plan: plan_rows(plan) for plan in PLAN_NAMES}
def _path_arg(p: str) -> str:
    """Paths handed to the scripts (which run with cwd = repo root): relative to the repo when
    inside it, else absolute, so the user's working directory does not matter."""
    a = os.path.abspath(p)
    rel = os.path.relpath(a, ROOT)
    return a if rel.startswith("..") else rel


class Row:
    """One plan entry: its config file and whether it has a pretraining stage."""

    def __init__(self, name: str, plan: str = "report"):
        self.name = name
        self.plan = plan
        self.config = os.path.join(plan_dir(plan), f"{name}.yaml")
        if not os.path.isfile(os.path.join(ROOT, self.config)):
            raise UserError(f"no plan row {name!r} ({self.config} missing)")
        raw = row_config(plan, name)
        self.pretrain = dict(raw.get("pretrain") or {})
        self.scratch = bool((raw.get("finetune") or {}).get("from_scratch")) or not self.pretrain

    def stages(self, finetune: bool = False) -> Tuple[str, ...]:
        """The stages to run; in a study-recipe plan `finetune` adds the short fine-tuning."""
        if uses_study_recipe(self.plan):
            return (STUDY_STAGES[1:] if self.scratch else STUDY_STAGES) + (("finetune",) if finetune else ())
        return STAGES[1:] if self.scratch else STAGES


def configured_epochs(stage: str, argv: List[str]) -> int:
    """The epochs a command will train, resolved by the script's own parser (also validates it)."""
    from config import SECTIONS, parse_config
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return parse_config(SECTIONS[stage], stage, argv).epochs
    finally:
        os.chdir(cwd)


def stage_done(stage: str, out_dir: str, epochs: int) -> bool:
    """Pretrain: checkpoint-last.pth and log.txt's last epoch at `epochs`; fine-tune / probe:
    results.json of `epochs` epochs. A cut-off last log line (a killed run) counts as not written:
    the stage's rerun repairs it; any other malformed file is a BadRunFile (util/runfiles.py)."""
    out_dir = os.path.join(ROOT, out_dir)
    if stage == "pretrain":
        log = read_log(os.path.join(out_dir, "log.txt"), drop_cut_tail=True)
        last = os.path.join(out_dir, "checkpoint-last.pth")
        return bool(log) and log[-1]["epoch"] + 1 >= epochs and os.path.isfile(last)
    res = read_json(os.path.join(out_dir, "results.json"))
    return res is not None and res.get("epochs") == epochs


class Stopped(Exception):
    """reproduce.py was asked to stop (SIGTERM / SIGINT); no stage starts after."""


class StageSignals:
    """SIGTERM / SIGINT while reproduce.py runs: passed on to the running stage, which finishes its
    step, saves its checkpoint and exits 128 + N (util/signals.py); no stage starts after, and
    reproduce.py exits 128 + N itself.

    The stage runs in its own process group, so that a signal sent to reproduce.py's whole group
    (Slurm's scancel, `timeout`, systemd, Ctrl-C) reaches it once, from here: a second one would
    kill it before it saves (util/signals.StopRequest)."""

    def __init__(self):
        self.signum, self.proc, self._old = 0, None, {}

    def __enter__(self) -> "StageSignals":
        self.signum = 0
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if self.proc is not None:
            self.proc.send_signal(signum)  # a no-op once it has exited

    def check(self, where: str) -> None:
        """Raise Stopped (saying `where`) if a signal came: called before a stage starts and after
        one ends."""
        if self.signum:
            raise Stopped(f"{signal.Signals(self.signum).name}: stopped {where}")

    def popen(self, argv: List[str], **kwargs) -> subprocess.Popen:
        """Start a stage in its own process group. The stop signals are held meanwhile, so one that
        comes while it starts is passed on once `proc` is set; the stage itself starts with them
        unblocked."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(argv, process_group=0,
                                         preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, held),
                                         **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return self.proc


STAGE = StageSignals()


def run_stage(cmd: List[str], log_file: str, quiet: bool) -> int:
    """Run one stage with cwd = repo root; stream its output to the console and to log_file."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n$ {shlex.join([sys.executable] + cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode())
        proc = STAGE.popen([sys.executable] + cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            while True:
                chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
                if not chunk:
                    break
                log.write(chunk)
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            return proc.wait()
        finally:
            STAGE.proc = None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="report", choices=sorted(PLANS), help="which table to reproduce")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these rows (configs/PLAN/NAME.yaml)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 per row")
    p.add_argument("--scale", default="full", choices=("full", "smoke"),
                   help="full: the report's recipe; smoke: configs/smoke.yaml settings (tiny model, 2 epochs)")
    p.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    p.add_argument("--data_path", default="", help="dataset root passed to every stage (default: the scripts')")
    p.add_argument("--output_root", default="", help="default: output/PLAN")
    p.add_argument("--device", default="", help="passed to every stage (auto, cpu, cuda, cuda:N)")
    p.add_argument("--precision", default="", help="passed to every stage (auto, bf16, fp32); default: the scripts'")
    p.add_argument("--figures_dir", default="", help="where figures and results.md go "
                                                    "(default: report_figures/; study: OUTPUT_ROOT)")
    p.add_argument("--no_figures", action="store_true", help="skip the figures at the end")
    p.add_argument("--quiet", action="store_true", help="stage output only to the .out files")
    g = p.add_argument_group("study plan only (--plan study)")
    g.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "cifar10"))
    g.add_argument("--train_subset", type=int, default=6000, help="first N training images (0: all)")
    g.add_argument("--pretrain_epochs", type=int, default=0, help="override the recipe's 8 epochs")
    g.add_argument("--probe_epochs", type=int, default=0, help="override the recipe's 300 probe epochs")
    g.add_argument("--model", default="", help="a models_mae model instead of the recipe's "
                                               "mae_vit_smoke_patch4 (default output root: output/PLAN-MODEL)")
    g.add_argument("--budgets", type=int, nargs="+", default=None, metavar="EPOCHS",
                   help="schedule plan: pretraining budgets (default: configs/schedule/plan.yaml's 8 32 96)")
    return p


def _check_folder(flag: str, path: str) -> None:
    """A folder to write into: it, or its nearest existing parent, must be a writable folder."""
    p = os.path.join(ROOT, path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UserError(f"{flag} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {p} is not writable")


def check_args(args) -> List[str]:
    """Validate the arguments before any work (raises UserError); returns the rows to run."""
    for flag, value, low in (("--seeds", args.seeds, 1), ("--train_subset", args.train_subset, 0),
                             ("--pretrain_epochs", args.pretrain_epochs, 0),
                             ("--probe_epochs", args.probe_epochs, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    check_study_flags(args)
    names = args.only or PLANS[args.plan]
    unknown = [n for n in names if n not in PLANS[args.plan]]
    if unknown:
        raise UserError(f"not rows of plan {args.plan!r}: {', '.join(unknown)} "
                        f"(choose from {', '.join(PLANS[args.plan])})")
    stray = [n for n in plan_finetune_rows(args.plan) if n not in PLANS[args.plan]]
    if stray:  # a typo there would otherwise fine-tune nothing, silently
        raise UserError(f"configs/{args.plan}/plan.yaml: finetune_rows {', '.join(stray)} not in its rows")
    if args.device or args.precision:  # the scripts' own rules, checked now rather than at the first stage
        from config import SECTIONS, parse_config
        parse_config(SECTIONS["pretrain"], "pretrain", shared_flags(args))
    _check_folder("--output_root", args.output_root)
    if args.figures_dir:
        _check_folder("--figures_dir", args.figures_dir)
    return names


def run_row(row: Row, seed: int, args, budget: Optional[int] = None) -> Optional[str]:
    """Run (or skip when done) every stage of one row and seed (at one budget in a plan with
    budgets); returns a failure note or None."""
    rdir = run_dir(args, row.name, seed, budget)
    label = f"{row.name}{f' budget {budget}' if budget else ''} seed {seed}"
    # the short fine-tuning (plan.yaml's finetune_rows): once per row and seed, at the longest budget
    finetune = row.name in plan_finetune_rows(row.plan) and (not budget or budget == max(args.budgets))
    cmds = {stage: stage_command(row, stage, seed, args, budget) for stage in row.stages(finetune)}
    if args.dry_run:
        for cmd in cmds.values():
            print(shlex.join(["python"] + cmd))
        return None
    os.makedirs(os.path.join(ROOT, rdir), exist_ok=True)
    again = ["python", "reproduce.py", "--plan", args.plan, "--only", row.name, "--scale", args.scale]
    again += _flags({"budgets": budget, "model": args.model or None})
    with open(os.path.join(ROOT, rdir, "commands.json"), "w") as f:
        json.dump({"reproduce": shlex.join(again),
                   "cwd": ROOT, **{s: shlex.join(["python"] + c) for s, c in cmds.items()}}, f, indent=2)
    for stage, cmd in cmds.items():
        out_dir, out_file = os.path.join(rdir, stage), os.path.join(rdir, f"{stage}.out")
        epochs = configured_epochs(stage, cmd[1:])
        try:
            if stage_done(stage, out_dir, epochs):
                print(f"[reproduce] {label} {stage}: done ({epochs} epochs), skipped")
                continue
            STAGE.check(f"before {label} {stage}")
            print(f"[reproduce] {label} {stage}: {shlex.join(['python'] + cmd)}", flush=True)
            t0 = time.time()
            rc = run_stage(cmd, os.path.join(ROOT, out_file), args.quiet)
            STAGE.check(f"{label} {stage} (exit {rc}; see {out_file})")
            failure = None if rc == 0 and stage_done(stage, out_dir, epochs) else f"exit {rc}; see {out_file}"
        except BadRunFile as e:
            failure = str(e)
        if failure:
            print(f"[reproduce] FAILED: {label} {stage} ({failure})", flush=True)
            return f"{label} {stage} ({failure})"  # later stages of this row/seed need this one
        print(f"[reproduce] {label} {stage}: finished in {time.time() - t0:.0f}s")
    return None


def write_outputs(args, names: List[str]) -> None:
    """The study's (or the schedule's) table and figure, or the report's figures and results.md."""
    if uses_study_recipe(args.plan):
        from report_figures.schedule import write_schedule
        from report_figures.study import write_study
        fig_dir = os.path.join(ROOT, _path_arg(args.figures_dir) if args.figures_dir else args.output_root)
        runs = os.path.join(ROOT, args.output_root)
        written = (write_schedule(runs, names, args.budgets, fig_dir, args.plan) if args.budgets
                   else write_study(runs, names, fig_dir, args.plan))
        with open(written[0]) as f:
            print(f.read())
        print(f"[reproduce] wrote {', '.join(os.path.relpath(w, ROOT) for w in written)}")
    elif not args.no_figures:
        from report_figures.figures import make_all
        fig_dir = _path_arg(args.figures_dir) if args.figures_dir else "report_figures"
        written = make_all(os.path.join(ROOT, args.output_root), os.path.join(ROOT, fig_dir))
        print(f"[reproduce] wrote {len(written)} files to {fig_dir}")


def _jobs(args, rows: List[Row]) -> List[Tuple[Row, int, Optional[int]]]:
    """(row, seed, budget) in run order."""
    # with budgets: the shortest budget first, every row and seed of it, so that an interrupted plan
    # leaves complete paired comparisons behind. A row without pretraining (scratch) does not depend
    # on the budget: it runs once, at the longest.
    if args.budgets:
        return [(row, seed, b) for b in args.budgets for seed in range(args.seeds) for row in rows
                if not row.scratch or b == args.budgets[-1]]
    return [(row, seed, None) for row in rows for seed in range(args.seeds)]


@cli
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    default_root = os.path.join("output", args.plan + (f"-{args.model}" if args.model else ""))
    args.output_root = _path_arg(args.output_root or default_root)
    names = check_args(args)
    if uses_study_recipe(args.plan) and not args.data_path:
        args.data_path = STUDY_DATA
    if args.data_path:
        args.data_path = _path_arg(args.data_path)
    rows = [Row(n, args.plan) for n in names]
    try:
        with STAGE:
            failures = [f for f in (run_row(row, seed, args, b) for row, seed, b in _jobs(args, rows)) if f]
            if args.dry_run:
                return 0
            write_outputs(args, names)
            STAGE.check("after the last stage")
    except Stopped as e:
        print(f"[reproduce] {e}; rerun the same command to continue", flush=True)
        return 128 + STAGE.signum
    if failures:
        print("[reproduce] failed stages:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
