"""The study recipe and the commands of its stages, for the plans with `recipe: study` in
configs/PLAN/plan.yaml (study, ablation, schedule): pretrain -> linear probe on cached features +
kNN, on Fashion-MNIST with a small model and a 6,000-image training subset (docs/RESULTS.md); the
rows in plan.yaml's `finetune_rows` also get a short fine-tuning (at the longest budget).
reproduce.py runs the commands; a plan with budgets (schedule) runs every row at each budget with
the values of report_figures.schedule.scale_to_budget.
"""
import os
import re
from typing import Dict, List, Optional

from models_arch import ARCHS, MAE_PREFIX
from report_figures.plans import plan_budgets, read_yaml, uses_study_recipe
from report_figures.schedule import budget_dir, scale_to_budget
from util.errors import UserError

STUDY_STAGES = ("pretrain", "linprobe")
STUDY_DATA = "/usr/share/datasets/fashion-mnist"
# The study's shared recipe (scale full); rows only add their pretrain options.
STUDY_RECIPE = {
    "pretrain": {"model": "mae_vit_smoke_patch4", "epochs": 8, "warmup_epochs": 2, "batch_size": 128,
                 "blr": 1.5e-3, "num_workers": 0, "print_freq": 100, "save_freq": 100},
    # LARS scales each step by 1e-3 * |w| / |g|, so the report's blr 0.1 barely moves the head in a
    # short schedule (30 epochs: 36% on an encoder whose kNN is 66%). On cached features epochs are
    # ~free, so the study probes to convergence instead: blr 5, 300 epochs (docs/RESULTS.md).
    "linprobe": {"model": "vit_smoke_patch4", "epochs": 300, "warmup_epochs": 10, "batch_size": 256,
                 "blr": 5.0, "cached_features": True, "knn": True, "num_workers": 0, "print_freq": 1000,
                 "save_freq": 1000},
    # The short fine-tuning column (issue 16): the report's recipe (main_finetune's defaults: layer
    # decay 0.75, drop path 0.1, label smoothing 0.1, RandAugment, random erasing 0.25, wd 0.05)
    # for 10 epochs instead of 100, at blr 5e-3 instead of 1e-3: the same for every row,
    # pretrained or from scratch. Chosen on pixel@16 seed 0 (docs/RESULTS.md section 6): 5 epochs
    # at blr 1e-3 reached 43.6% (probe 77), 5 at 5e-3 60.5, 10 at 2e-3 63.5, 10 at 5e-3 67.6, 10 at
    # 1e-2 65.8.
    "finetune": {"model": "vit_smoke_patch4", "epochs": 10, "warmup_epochs": 1, "batch_size": 128,
                 "blr": 5.0e-3, "weight_decay": 0.05, "num_workers": 0, "print_freq": 1000, "save_freq": 1000},
}
# Defaults the study's rows were measured with that are no longer the code's defaults: passed unless
# the row's YAML sets the key itself, so every measured row reruns as it ran (docs/RESULTS.md).
# feature_head_init: official MAE's xavier, the default until the report's `torch` became it (issue 27).
STUDY_PINNED = {"feature_head_init": "xavier"}
STUDY_SMOKE = {"pretrain": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32},
               "linprobe": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32},
               "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32}}
# pretrain options counted in epochs: capped below the smoke run's 2 epochs (without budgets)
_EPOCH_OPTS = ("k", "wse", "feature_ramp")


def flags(d: Dict[str, object]) -> List[str]:
    """{key: value} -> ['--key', 'value', ...]; booleans become --key / --no-key."""
    out: List[str] = []
    for k, v in d.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no-{k}")
        elif v is not None:
            out += [f"--{k}", str(v)]
    return out


def run_dir(args, name: str, seed: int, budget: Optional[int] = None) -> str:
    """OUTPUT_ROOT/NAME/seedS, or OUTPUT_ROOT/NAME/budgetB/seedS in a plan with budgets."""
    return os.path.join(args.output_root, name, *([budget_dir(budget)] if budget else []), f"seed{seed}")


ROW_RUN = re.compile(r"\{row:(\w+)\}")


def other_runs(pretrain: dict, args, seed: int, budget: Optional[int]) -> dict:
    """Row options naming another row's run, "{row:NAME}/...", with that row's run directory at the
    same seed and budget filled in (e.g. `teacher: "{row:pixel}/pretrain/encoder.safetensors"`: the
    pixel MAE of the same seed as a teacher). That row must have run first (plan order)."""
    return {k: ROW_RUN.sub(lambda m: run_dir(args, m.group(1), seed, budget), v)
            for k, v in pretrain.items() if isinstance(v, str) and ROW_RUN.search(v)}


SMOKE = os.path.join("configs", "smoke.yaml")
FULL_EVAL = {"finetune": os.path.join("configs", "finetune.yaml"),
             "linprobe": os.path.join("configs", "linprobe.yaml")}
SCRIPTS = {"pretrain": "main_pretrain.py", "finetune": "main_finetune.py", "linprobe": "main_linprobe.py"}
STAGES = ("pretrain", "finetune", "linprobe")


def stage_command(row, stage: str, seed: int, args, budget: Optional[int] = None) -> List[str]:
    """argv (without the interpreter) of one stage of a plan row (reproduce.Row): the script,
    its --config, where it starts (evaluation stages), the recipe's values (`_study_values` or
    `_report_values`), then the run directory, seed, data and the flags every stage shares."""
    rdir = run_dir(args, row.name, seed, budget)
    study = uses_study_recipe(row.plan)
    cmd = [SCRIPTS[stage]]
    if stage == "pretrain":
        cmd += ["--config", row.config]
    elif not study:  # the report's evaluation recipes are files; the study's are values
        cmd += ["--config", SMOKE if args.scale == "smoke" else FULL_EVAL[stage]]
    if stage != "pretrain":
        cmd += ["--from_scratch"] if row.scratch else ["--finetune", os.path.join(rdir, "pretrain", "checkpoint-last.pth")]
    values = _study_values(row, stage, seed, args, budget) if study else _report_values(row, stage, args)
    cmd += flags(values) + ["--output_dir", os.path.join(rdir, stage), "--seed", str(seed)]
    cmd += ["--data_path", args.data_path] if args.data_path else []
    return cmd + shared_flags(args)


def shared_flags(args) -> List[str]:
    """The flags reproduce.py hands to every stage unchanged."""
    return flags({"device": args.device or None, "precision": args.precision or None})


def _report_values(row, stage: str, args) -> dict:
    """The report plan: its rows' files and the scripts' defaults are the recipe; at scale smoke,
    configs/smoke.yaml's values, the epoch-counted k / wse capped by the smoke run's."""
    if stage != "pretrain" or args.scale != "smoke":
        return {}
    smoke = read_yaml(SMOKE)
    vals = {k: v for k, v in smoke.items() if k not in STAGES}
    for k, v in (smoke.get("pretrain") or {}).items():
        # k / wse: the smoke value caps the row's (they must stay below the 2 epochs)
        vals[k] = min(v, row.pretrain[k]) if k in row.pretrain and isinstance(v, int) else v
    return vals


def _study_values(row, stage: str, seed: int, args, budget: Optional[int] = None) -> dict:
    """A study-recipe plan: the shared recipe + the row's options; with a budget, the epochs and
    epoch-counted options of scale_to_budget."""
    vals = {"dataset": args.dataset, "train_subset": args.train_subset, **STUDY_RECIPE[stage]}
    if args.scale == "smoke":
        vals.update(STUDY_SMOKE[stage])
    if args.model:  # the probe reads the same encoder (models_vit name = models_mae name - "mae_")
        vals["model"] = args.model if stage == "pretrain" else args.model[len(MAE_PREFIX):]
    if stage == "pretrain":
        vals.update({k: v for k, v in STUDY_PINNED.items() if k not in row.pretrain})
        vals.update(other_runs(row.pretrain, args, seed, budget))
        if budget:
            vals.update(scale_to_budget(row.pretrain, budget, STUDY_RECIPE["pretrain"]))
        elif args.pretrain_epochs:
            vals["epochs"] = args.pretrain_epochs
        if args.scale == "smoke" and not budget:
            for k in _EPOCH_OPTS:
                if k in row.pretrain:
                    vals[k] = min(int(row.pretrain[k]), 1)
    elif args.probe_epochs and stage == "linprobe":
        vals["epochs"] = args.probe_epochs
    return vals


def check_study_flags(args) -> None:
    """--model (study-recipe plans) and --budgets (plans with budgets): where they apply, valid.
    Sets args.budgets to the budgets to run (the plan's by default), or leaves it None."""
    if args.model and not uses_study_recipe(args.plan):
        raise UserError(f"--model applies to the study-recipe plans, not to plan {args.plan!r}")
    if args.model and not (args.model.startswith(MAE_PREFIX) and args.model[len(MAE_PREFIX):] in ARCHS):
        raise UserError(f"--model {args.model}: not a models_mae model (choose from "
                        f"{', '.join(MAE_PREFIX + a for a in ARCHS)})")
    if not plan_budgets(args.plan):
        if args.budgets is not None:
            raise UserError(f"--budgets applies to a plan with budgets (schedule), not to plan {args.plan!r}")
        return
    if args.pretrain_epochs:
        raise UserError(f"--pretrain_epochs: plan {args.plan!r} sets the epochs with --budgets")
    args.budgets = sorted(set(args.budgets or plan_budgets(args.plan)))
    if min(args.budgets) < 2:  # ema's wse must stay below the epochs
        raise UserError(f"--budgets must be >= 2 epochs, got {min(args.budgets)}")
