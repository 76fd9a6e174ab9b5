"""Reading reproduce.py's run directories: RUNS/NAME/seedS/{pretrain,finetune,linprobe}/
(log.txt, results.json, config.yaml, commands.json) into plain dicts, and their statistics."""
import glob
import json
import math
import os
from typing import Dict, List, Optional

import yaml

from results.plans import plan_rows, row_config, row_family

STAGES = ("pretrain", "finetune", "linprobe")


def read_log(path: str) -> List[dict]:
    """The JSON lines of a log.txt ([] when absent; unreadable lines skipped)."""
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


def read_yaml_file(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def _seed_of(path: str) -> int:
    tail = os.path.basename(path)[len("seed"):]
    return int(tail) if tail.isdigit() else 0


def _read_seed(seed_dir: str) -> Dict[str, dict]:
    """{stage: {"dir", "log", "results", "config"}} for the stages present in one seed's directory."""
    stages = {}
    for st in STAGES:
        d = os.path.join(seed_dir, st)
        if os.path.isdir(d):
            stages[st] = {"dir": d, "log": read_log(os.path.join(d, "log.txt")),
                          "results": read_json(os.path.join(d, "results.json")),
                          "config": read_yaml_file(os.path.join(d, "config.yaml")) or {}}
    return stages


def _read_row(row_dir: str, plan: str) -> Optional[dict]:
    """One row's seeds, commands, family (its target kind, or scratch) and nominal parameters
    (its plan YAML's pretrain options: the sweeps' x axes; at smoke scale the run's own k / wse
    are capped, the results table shows what actually ran)."""
    name = os.path.basename(row_dir)
    row = {"name": name, "seeds": {}, "commands": None}
    for sd in sorted(glob.glob(os.path.join(row_dir, "seed*")), key=_seed_of):
        stages = _read_seed(sd)
        if stages:
            row["seeds"][_seed_of(sd)] = stages
        if row["commands"] is None:
            row["commands"] = read_json(os.path.join(sd, "commands.json"))
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
