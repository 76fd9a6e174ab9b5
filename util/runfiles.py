"""The one reader of a run directory's files: log.txt (a JSON object per epoch), results.json and
commands.json (a JSON object), config.yaml (a YAML mapping).

A file that is not what its writer writes raises BadRunFile: one line naming the file (and the
line, in log.txt) and what is wrong with it. An absent file is not malformed: None ([] for log.txt).

The rule for malformed files, the same in every tool:
- Training (util/logger.RunLogger) and reproduce.py's stage-done check (which decides whether to
  run a stage again) drop a cut-off LAST line of log.txt: no newline at its end and not valid JSON,
  left by a run killed while appending it. The trainer's rewind then rewrites the log from the
  checkpoint. Anything else malformed stops them: the script with one line and exit 2, reproduce.py
  that row and seed (a failed stage, in one line).
- Readers of finished runs (the results tables and figures, report_figures/compare.py,
  report_figures/make_figures.py) drop nothing: a seed with a malformed file, a cut-off last line
  included, is skipped, said in one line on stderr (`skip_seed`), and the rest is made from the
  other seeds. With no seed left, compare.py and make_figures.py refuse in one line, exit 2.
- benchmarks/gpu_check.py: a malformed log.txt of its own runs is a failed check, said in its line.
"""
import json
import os
import sys
from typing import Any, Dict, List, Optional

import yaml

from util.errors import UserError

# Keys the tools compute with: an integer / a number wherever they appear (null too in results.json
# and commands.json: a value not measured, e.g. the last acc@1 of a run without evaluation).
INTEGERS = ("epoch", "epochs", "step", "accum_iter", "batch_size")
NUMBERS = INTEGERS + ("loss", "seconds", "test_acc1", "test_acc5", "best_acc1", "last_acc1", "last_acc5",
                      "knn_acc", "target_std", "pred_std", "target_erank")


class BadRunFile(UserError):
    """A run file that is not what its writer writes (one line: the file, the line, the fault)."""


def _kind(value: Any) -> str:
    """What a JSON / YAML value is, in words."""
    for t, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
                    (list, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return name
    return "null" if value is None else type(value).__name__


def _check_values(obj: Dict[str, Any], where: str, nullable: bool) -> None:
    for key in NUMBERS:
        if key not in obj or (obj[key] is None and nullable):
            continue
        value, want = obj[key], int if key in INTEGERS else (int, float)
        if isinstance(value, bool) or not isinstance(value, want):
            raise BadRunFile(f"{where}: {key!r} is {_kind(value)} ({value!r:.40}), not "
                             f"{'an integer' if key in INTEGERS else 'a number'}")


def read_text(path: str) -> Optional[str]:
    """The file's text; None when absent."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise BadRunFile(f"{path} is not UTF-8 text (byte {e.start})")
    except OSError as e:
        raise BadRunFile(f"{path} cannot be read ({e.strerror or e})")


def parse_log(text: str, path: str, drop_cut_tail: bool = False) -> List[Dict[str, Any]]:
    """log.txt's records, one JSON object per line with an integer "epoch" (blank lines hold
    nothing). drop_cut_tail: the training rule for a cut-off last line (module docstring)."""
    lines = text.split("\n")  # the last item: "" when the file ends with a newline, else a cut line
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except ValueError as e:
            if n == len(lines):  # no newline after it: the writer was stopped in the middle
                if drop_cut_tail:
                    break
                raise BadRunFile(f"{where} is cut off (no newline at its end, not valid JSON): its run was "
                                 f"killed while writing it")
            raise BadRunFile(f"{where} is not valid JSON ({getattr(e, 'msg', e)})")
        if not isinstance(record, dict):
            raise BadRunFile(f"{where} is {_kind(record)}, not a JSON object")
        if "epoch" not in record:
            raise BadRunFile(f"{where} has no \"epoch\"")
        _check_values(record, where, nullable=False)
        records.append(record)
    return records


def read_log(path: str, drop_cut_tail: bool = False) -> List[Dict[str, Any]]:
    """log.txt's records ([] when absent)."""
    text = read_text(path)
    return [] if text is None else parse_log(text, path, drop_cut_tail)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """results.json / commands.json: a JSON object (None when absent)."""
    text = read_text(path)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise BadRunFile(f"{path} is not valid JSON ({getattr(e, 'msg', e)})")
    if not isinstance(obj, dict):
        raise BadRunFile(f"{path} is {_kind(obj)}, not a JSON object")
    _check_values(obj, path, nullable=True)
    return obj


def read_yaml(path: str) -> Optional[Dict[str, Any]]:
    """config.yaml: a YAML mapping (None when absent)."""
    text = read_text(path)
    if text is None:
        return None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise BadRunFile(f"{path} is not valid YAML ({getattr(e, 'problem', None) or 'syntax error'}"
                         f"{f' at line {mark.line + 1}' if mark else ''})")
    if not isinstance(obj, dict):
        raise BadRunFile(f"{path} is {'empty' if obj is None else _kind(obj)}, not a YAML mapping")
    _check_values(obj, path, nullable=False)
    return obj


def read_run(output_dir: str) -> Dict[str, Any]:
    """One run directory's files: {"dir", "log", "results", "config"} (log [] and config {} when
    absent, results None)."""
    return {"dir": output_dir, "log": read_log(os.path.join(output_dir, "log.txt")),
            "results": read_json(os.path.join(output_dir, "results.json")),
            "config": read_yaml(os.path.join(output_dir, "config.yaml")) or {}}


def skip_seed(row: str, seed: int, error: BadRunFile) -> None:
    """A reader of finished runs leaves out a seed with a malformed file, and says so."""
    print(f"skipped seed {seed} of row {row}: {error}", file=sys.stderr)
