"""util/runfiles.py, the one reader of run directories, and its rule for malformed files: the trainer
drops a cut-off last log line (and its rewind repairs it); the readers of finished runs
(report_figures/compare.py, report_figures/make_figures.py) skip a seed with any malformed file, saying so
in one line, and refuse in one line (exit 2) when no seed is left."""
import json
import os
import runpy
import sys

import pytest

from conftest import ROOT, run_main, smoke_args
from util.errors import UserError
from util.logger import RunLogger
from util.runfiles import BadRunFile, read_json, read_log, read_yaml

MAKE_FIGURES = os.path.join(ROOT, "report_figures", "make_figures.py")
LOG = json.dumps({"epoch": 0, "loss": 0.5, "seconds": 2.0, "step": 5, "regress": "pixel",
                  "test_acc1": 50.0, "best_acc1": 50.0}) + "\n"
RESULTS = json.dumps({"best_acc1": 50.0, "last_acc1": 49.0, "knn_acc": 60.0, "epochs": 1})
CONFIG = "target: pixel\nepochs: 1\nmodel: mae_vit_smoke_patch4\nprecision: fp32\n"

# name: (file under seedS/, its content (None: a folder there), what the skip line says after the path)
DEFECTS = {
    "results.json a list": ("linprobe/results.json", "[50.0, 60.0]", " is a list, not a JSON object"),
    "string metric": ("linprobe/results.json", '{"best_acc1": "high", "knn_acc": 60.0}',
                      ": 'best_acc1' is a string ('high'), not a number"),
    "scalar log line": ("pretrain/log.txt", LOG + "3\n", " line 2 is a number, not a JSON object"),
    "config.yaml a list": ("pretrain/config.yaml", "- precision\n- fp32\n", " is a list, not a YAML mapping"),
    "cut-off last line": ("pretrain/log.txt", LOG + '{"epoch": 1, "seco',
                          " line 2 is cut off (no newline at its end, not valid JSON): its run was killed while "
                          "writing it"),
    # beyond the list
    "invalid JSON line": ("pretrain/log.txt", "{epoch: 0}\n" + LOG,
                          " line 1 is not valid JSON (Expecting property name"),
    "log line without epoch": ("pretrain/log.txt", '{"loss": 0.5}\n', ' line 1 has no "epoch"'),
    "string epoch": ("pretrain/log.txt", '{"epoch": "0"}\n', " line 1: 'epoch' is a string ('0'), not an integer"),
    "null loss": ("pretrain/log.txt", '{"epoch": 0, "loss": null}\n', " line 1: 'loss' is null (None), not a number"),
    "boolean metric": ("linprobe/results.json", '{"best_acc1": true}',
                       ": 'best_acc1' is a boolean (True), not a number"),
    "empty results.json": ("linprobe/results.json", "", " is not valid JSON (Expecting value)"),
    "results.json a folder": ("linprobe/results.json", None, " cannot be read (Is a directory)"),
    "log not UTF-8": ("pretrain/log.txt", b"\xff\xfe{}\n", " is not UTF-8 text (byte 0)"),
    "invalid YAML": ("pretrain/config.yaml", "precision: [fp32\n", " is not valid YAML (expected ',' or ']'"),
    "empty config.yaml": ("pretrain/config.yaml", "", " is empty, not a YAML mapping"),
    "string epochs in config": ("pretrain/config.yaml", "epochs: two\n",
                                ": 'epochs' is a string ('two'), not an integer"),
    "cut-off commands.json": ("commands.json", '{"reproduce": "python rep', " is not valid JSON (Unterminated string"),
}


def _seed(root, row, seed, defect=None):
    """RUNS/ROW/seedS as reproduce.py writes it (pretrain, finetune, linprobe), with one defect."""
    d = root / row / f"seed{seed}"
    for st in ("pretrain", "finetune", "linprobe"):
        (d / st).mkdir(parents=True)
        (d / st / "log.txt").write_text(LOG)
        (d / st / "config.yaml").write_text(CONFIG)
        if st != "pretrain":
            (d / st / "results.json").write_text(RESULTS)
    (d / "commands.json").write_text('{"reproduce": "python reproduce.py"}')
    if defect is None:
        return None
    rel, content, says = DEFECTS[defect]
    path = d / rel
    if content is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f"skipped seed {seed} of row {row}: {path}{says}"


def _make_figures(*argv):
    """report_figures/make_figures.py as the shell runs it (in this process, to stay quick)."""
    old = sys.argv
    sys.argv = [MAKE_FIGURES, *map(str, argv)]
    try:
        runpy.run_path(MAKE_FIGURES, run_name="__main__")
    finally:
        sys.argv = old


def _compare(*argv):
    from report_figures.compare import main
    main(list(map(str, argv)))


# ---- the readers of finished runs: through the tools' command lines ---------------------------
@pytest.mark.parametrize("defect", DEFECTS)
def test_compare_skips_a_seed_with_a_malformed_file(defect, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed in (0, 1):
        _seed(a, "pixel", seed)
    _seed(b, "pixel", 0)
    says = _seed(b, "pixel", 1, defect)
    _compare(a, b, "--rows", "pixel")
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith(says)
    assert "| pixel | 1 |" in out  # from seed 0 alone


@pytest.mark.parametrize("defect", DEFECTS)
def test_make_figures_with_only_malformed_seeds_refuses(defect, tmp_path, capsys):
    says = _seed(tmp_path / "runs", "pixel", 3, defect)
    with pytest.raises(SystemExit) as e:
        _make_figures("--runs", tmp_path / "runs", "--out", tmp_path / "figs", "--no_models")
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 2 and err[0].startswith(says)
    assert err[1] == f"error: no runs in {tmp_path / 'runs'} (RUNS/NAME/seedS/{{pretrain,finetune,linprobe}}/, as " \
                     f"reproduce.py writes them)"
    assert not (tmp_path / "figs").exists()


def test_make_figures_skips_each_malformed_seed_saying_so(tmp_path, capsys):
    runs, figs = tmp_path / "runs", tmp_path / "figs"
    _seed(runs, "pixel", 0)
    says = [_seed(runs, "pixel", seed, defect) for seed, defect in enumerate(DEFECTS, 1)]
    (runs / "pixel" / "seed0_old").mkdir()  # not a seed folder: ignored (it was read as seed 0)
    _make_figures("--runs", runs, "--out", figs, "--no_models")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(says) and all(line.startswith(s) for line, s in zip(err, says))
    with open(figs / "results.json") as f:
        assert json.load(f)["pixel"]["seeds"] == [0]


def test_compare_with_only_malformed_seeds_refuses(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _seed(a, "pixel", 0)
    says = _seed(b, "pixel", 0, "scalar log line")
    with pytest.raises(SystemExit) as e:
        _compare(a, b, "--rows", "pixel")
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err == [says, "error: no seed of pixel has a finished probe in both roots"]


@pytest.mark.parametrize("root,says", [("missing", "error: no run directory {runs}"),
                                       ("empty", "error: no runs in {runs} (")])
def test_make_figures_refuses_a_missing_or_empty_root(root, says, tmp_path, capsys):
    runs = tmp_path / "runs"
    if root == "empty":
        runs.mkdir()
    with pytest.raises(SystemExit) as e:
        _make_figures("--runs", runs, "--out", tmp_path / "figs")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(says.format(runs=runs))


# ---- the reader itself -------------------------------------------------------------------------
def test_absent_files_are_not_malformed(tmp_path):
    assert read_log(str(tmp_path / "log.txt")) == [] and read_json(str(tmp_path / "r.json")) is None
    assert read_yaml(str(tmp_path / "c.yaml")) is None


def test_log_records_and_the_cut_off_last_line(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text(LOG + "\n" + '{"epoch": 1}')  # a blank line; a complete last line without newline
    assert [r["epoch"] for r in read_log(str(path))] == [0, 1]
    path.write_text(LOG + '{"epoch": 1, "lo')
    with pytest.raises(BadRunFile, match="line 2 is cut off") as e:
        read_log(str(path))
    assert isinstance(e.value, UserError)  # one line and exit 2 in a @cli main
    assert [r["epoch"] for r in read_log(str(path), drop_cut_tail=True)] == [0]  # the training rule
    path.write_text('{"epoch": 0, "lo\n' + LOG)  # cut, then more: not a kill's trace, never dropped
    with pytest.raises(BadRunFile, match="line 1 is not valid JSON"):
        read_log(str(path), drop_cut_tail=True)


def test_null_is_a_value_not_measured_in_results_only(tmp_path):
    (tmp_path / "results.json").write_text('{"best_acc1": 50.0, "last_acc1": null}')
    assert read_json(str(tmp_path / "results.json"))["last_acc1"] is None
    (tmp_path / "config.yaml").write_text("epochs: 2\naccum_iter: null\n")
    with pytest.raises(BadRunFile, match="config.yaml: 'accum_iter' is null"):
        read_yaml(str(tmp_path / "config.yaml"))
    (tmp_path / "config.yaml").write_text("epochs: 2\nlr: null\n")  # a key no tool computes with
    assert read_yaml(str(tmp_path / "config.yaml")) == {"epochs": 2, "lr": None}


# ---- the trainer's log: a cut-off last line is repaired, nothing else is dropped ---------------
def test_logger_rewind_repairs_a_cut_off_last_line_only(tmp_path):
    log = RunLogger(str(tmp_path))
    path = tmp_path / "log.txt"
    path.write_text(LOG + '{"epoch": 1, "lo')
    assert log.last_epoch() == 0
    log.rewind(5)
    assert path.read_text() == LOG
    path.write_text("3\n" + LOG)
    with pytest.raises(BadRunFile, match="line 1 is a number, not a JSON object"):
        log.rewind(5)
    assert path.read_text() == "3\n" + LOG  # untouched (the old reader cut the log at the bad line)


@pytest.mark.slow
def test_rerun_after_a_kill_mid_write_repairs_the_log(cifar_root, tmp_path, capsys):
    """A run killed while appending its log line: the rerun rewinds the log to its checkpoint and
    goes on; a malformed line elsewhere stops it in one line, exit 2."""
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "1"))
    path = tmp_path / "log.txt"
    first = path.read_text()
    path.write_text(first + '{"epoch": 1, "loss": 0.')
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "2"))
    log = read_log(str(path))
    assert [r["epoch"] for r in log] == [0, 1] and path.read_text().startswith(first)
    path.write_text("[]\n" + path.read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--epochs", "3"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {path} line 1 is a list, not a JSON object\n"
