"""The plans reproduce.py runs: configs/PLAN/plan.yaml (the rows in table order, and what the
tables need) and each row's configs/PLAN/NAME.yaml (the options it passes to the scripts)."""
import os
from typing import Any, Dict, List

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_NAMES = ("report", "study", "ablation", "schedule")
SCRATCH = "scratch"  # the family of a row without pretraining (random init)


def plan_dir(plan: str) -> str:
    """configs/PLAN, relative to the repository root."""
    return os.path.join("configs", plan)


def read_yaml(rel: str) -> Dict[str, Any]:
    """A YAML file given relative to the repository root ({} when empty)."""
    with open(os.path.join(ROOT, rel)) as f:
        return yaml.safe_load(f) or {}


def load_plan(plan: str) -> Dict[str, Any]:
    """configs/PLAN/plan.yaml: {"rows": [NAME, ...], ...}."""
    return read_yaml(os.path.join(plan_dir(plan), "plan.yaml"))


def uses_study_recipe(plan: str) -> bool:
    """Plans with `recipe: study` run the study's pretrain -> cached probe + kNN on Fashion-MNIST
    (report_figures.recipe.STUDY_RECIPE) and its table; the others the report's three stages."""
    return load_plan(plan).get("recipe") == "study"


def plan_budgets(plan: str) -> List[int]:
    """The pretraining budgets (epochs) a plan runs every row at (`budgets:` in plan.yaml, e.g. the
    schedule plan's [8, 32, 96]); [] for a plan of one budget."""
    return [int(b) for b in load_plan(plan).get("budgets") or []]


def plan_rows(plan: str) -> List[str]:
    return list(load_plan(plan)["rows"])


def plan_finetune_rows(plan: str) -> List[str]:
    """The rows of a study-recipe plan that are also fine-tuned briefly (`finetune_rows:` in
    plan.yaml; recipe: report_figures.recipe.STUDY_RECIPE["finetune"]); in a plan with budgets, at the
    longest budget only. [] when the plan has none."""
    return list(load_plan(plan).get("finetune_rows") or [])


def row_config(plan: str, name: str) -> Dict[str, Any]:
    """configs/PLAN/NAME.yaml, {} when there is none."""
    path = os.path.join(plan_dir(plan), f"{name}.yaml")
    return read_yaml(path) if os.path.isfile(os.path.join(ROOT, path)) else {}


def row_family(raw: Dict[str, Any]) -> str:
    """A row's family: its pretraining target kind, or SCRATCH without pretraining."""
    return (raw.get("pretrain") or {}).get("target", SCRATCH)
