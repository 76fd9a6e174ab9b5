"""The house a forker reads: the core apart from the tooling, and a README whose claims hold.

Core: models, targets, engines, config, data, run infrastructure, the three main scripts and
export_weights.py. Tooling: reproduce.py, report_figures/, benchmarks/ (plans, runs and readers of
experiments). The core imports nothing from the tooling; no module imports a script.
"""
import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

from config import HELP_GROUPS, SECTIONS, help_groups
from conftest import ROOT

TOOLING = ("reproduce", "report_figures", "benchmarks")
SCRIPTS = ("main_pretrain", "main_finetune", "main_linprobe", "export_weights")
README = os.path.join(ROOT, "README.md")


def python_files():
    """Repository-relative paths of every non-test Python file."""
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in ("tests", "output", "data"))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, name), ROOT)


def is_tooling(rel: str) -> bool:
    return rel.split(os.sep)[0].removesuffix(".py") in TOOLING


def imported_modules(rel: str):
    """Every module `rel` imports, at any depth (function-level imports too), as dotted names."""
    with open(os.path.join(ROOT, rel)) as f:
        tree = ast.parse(f.read(), rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def core_lines() -> int:
    total = 0
    for rel in python_files():
        if not is_tooling(rel):
            with open(os.path.join(ROOT, rel)) as f:
                total += sum(1 for _ in f)
    return total


def test_the_core_imports_no_tooling_and_nothing_imports_a_script():
    files = list(python_files())
    assert "engine_pretrain.py" in files and "report_figures/figures.py" in files and "reproduce.py" in files
    wrong = []
    for rel in files:
        for module in imported_modules(rel):
            top = module.split(".")[0]
            if top in SCRIPTS:
                wrong.append(f"{rel} imports the script {module}")
            if top in TOOLING and not is_tooling(rel):
                wrong.append(f"{rel} (core) imports the tooling module {module}")
            if rel.startswith("util" + os.sep) and top.startswith("engine_"):
                wrong.append(f"{rel} (run infrastructure) imports the engine {module}")
    assert not wrong, "\n".join(wrong)


def _readme() -> str:
    with open(README) as f:
        return f.read()


def test_readme_front_door():
    """At most ~200 lines; what it is and the two quickstart commands on the first screen, the
    test command being CI's; the core's line count as it is (within 10%)."""
    text = _readme()
    lines = text.splitlines()
    assert len(lines) <= 200, len(lines)
    first_screen = "\n".join(lines[:30])
    assert "python main_pretrain.py --target ema --tau 0.995 --wse 20" in first_screen
    assert "python -m pytest -q tests" in first_screen
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert f.read().strip().splitlines()[-1] == "python -m pytest -q tests"
    stated = re.search(r"([\d,]+) lines of Python", text)
    assert stated, "the code map says how many lines the core is"
    assert abs(int(stated.group(1).replace(",", "")) - core_lines()) <= 0.1 * core_lines()


def _flag_groups():
    """HELP_GROUPS' titles with the target-kind groups after "target": the three scripts' flags."""
    groups = {}
    for cls in (SECTIONS["pretrain"], SECTIONS["finetune"], SECTIONS["linprobe"]):
        for title, fields in help_groups(cls):
            groups.setdefault(title, [])
            groups[title] += [f for f in fields if f not in groups[title]]
    order = [t for t, _ in HELP_GROUPS]
    kinds = [t for t in groups if t not in order]
    order = order[:order.index("target") + 1] + kinds + order[order.index("target") + 1:]
    return [(t, groups[t]) for t in order if t in groups]


def test_readme_flag_table_follows_the_help_groups():
    """Every flag of the three scripts, once, in its --help group, groups in --help's order."""
    text = _readme()
    section = text[text.index("## Flags"):]
    section = section[:section.index("\n## ", 5)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    table = [(cells[0], re.findall(r"`--(\w+)`", cells[1]))
             for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)]
    assert table == _flag_groups()


def readme_commands_to_run():
    """The README's fenced commands that use configs/smoke.yaml or --dry_run, in order; a block
    with a smoke.yaml command runs whole (it prepares the data its commands read and exports
    what they train), other blocks only their --dry_run lines."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", _readme(), re.S):
        cmds = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip().startswith("python")]
        smoke = any("configs/smoke.yaml" in c for c in cmds)
        out += [c for c in cmds if smoke or "--dry_run" in c]
    return out


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """Each command of those blocks, run as written in a directory that looks like a clone (the
    repository's files linked in), so what they write stays in tmp_path."""
    cmds = readme_commands_to_run()
    assert sum("configs/smoke.yaml" in c for c in cmds) >= 3 and sum("--dry_run" in c for c in cmds) >= 3, cmds
    for name in os.listdir(ROOT):
        if name not in (".git", "output", "data", ".venv") and not name.startswith(".pytest"):
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "python"
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    assert (tmp_path / "output" / "smoke" / "lp" / "results.json").is_file()
    assert (tmp_path / "output" / "smoke" / "export" / "encoder.safetensors").is_file()
