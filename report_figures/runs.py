"""Reading reproduce.py's run directories: RUNS/NAME/seedS/{pretrain,finetune,linprobe}/
(log.txt, results.json, config.yaml, commands.json) into plain dicts, and their statistics. The
files are read by util/runfiles.py: a seed with a malformed one is left out, said on stderr."""
import glob
import math
import os
from typing import Dict, List, Optional, Tuple

from report_figures.plans import plan_rows, row_config, row_family
from util.runfiles import BadRunFile, read_json, read_run, skip_seed

STAGES = ("pretrain", "finetune", "linprobe")


def seed_dirs(row_dir: str) -> List[Tuple[int, str]]:
    """[(S, ROW_DIR/seedS)] in seed order; other folders (seed0_old, ...) are not seeds."""
    found = os.listdir(row_dir) if os.path.isdir(row_dir) else []
    return sorted((int(f[4:]), os.path.join(row_dir, f)) for f in found
                  if f.startswith("seed") and f[4:].isdigit() and os.path.isdir(os.path.join(row_dir, f)))


def read_seed(row: str, seed: int, seed_dir: str) -> Optional[Dict[str, dict]]:
    """{stage: util.runfiles.read_run(...)} for the stages present in one seed's directory, and
    "commands" (commands.json, or None); None, said on stderr, when one of its files is malformed
    (util/runfiles.py's rule for readers of finished runs)."""
    try:
        stages = {st: read_run(os.path.join(seed_dir, st)) for st in STAGES
                  if os.path.isdir(os.path.join(seed_dir, st))}
        return {**stages, "commands": read_json(os.path.join(seed_dir, "commands.json"))}
    except BadRunFile as e:
        skip_seed(row, seed, e)
        return None


def _read_row(row_dir: str, plan: str) -> Optional[dict]:
    """One row's seeds, commands, family (its target kind, or scratch) and nominal parameters
    (its plan YAML's pretrain options: the sweeps' x axes; at smoke scale the run's own k / wse
    are capped, the results table shows what actually ran)."""
    name = os.path.basename(row_dir)
    row = {"name": name, "seeds": {}, "commands": None}
    for seed, sd in seed_dirs(row_dir):
        files = read_seed(name, seed, sd)
        if files is None:
            continue
        commands = files.pop("commands")
        if files:
            row["seeds"][seed] = files
        if row["commands"] is None:
            row["commands"] = commands
    if not row["seeds"]:
        return None
    raw = row_config(plan, name)
    pcfg = row["seeds"][min(row["seeds"])].get("pretrain", {}).get("config") or {}
    row["family"] = pcfg.get("target") if pcfg else row_family(raw)
    row["pretrain_config"] = pcfg
    row["nominal"] = {"family": row_family(raw), **(raw.get("pretrain") or {})} if raw else {}
    return row


def collect(runs_root: str, plan: str = "report") -> Dict[str, dict]:
    """{row name: {"seeds": {seed: {stage: {...}}}, "commands", "family", "pretrain_config",
    "nominal"}}, the plan's rows first in plan order, then any other row by name."""
    rows = {}
    for row_dir in sorted(glob.glob(os.path.join(runs_root, "*"))):
        row = _read_row(row_dir, plan) if os.path.isdir(row_dir) else None
        if row is not None:
            rows[row["name"]] = row
    order = plan_rows(plan)
    return dict(sorted(rows.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                                     kv[0])))


def first_seed(row: dict) -> Dict[str, dict]:
    """The stages of the row's lowest seed."""
    return row["seeds"][min(row["seeds"])]


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
