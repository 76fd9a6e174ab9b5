"""reproduce.py: smoke-scale plan end to end, skipping finished stages, resuming interrupted
ones, and every full-scale --dry_run command accepted by its script's own parser.

To stay fast on a CPU, most stages run in-process (reproduce.run_stage patched to call the
script's main()); the tests of a stage's resume and of stop signals run real processes.
"""
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import reproduce
from report_figures.recipe import SCRIPTS
from conftest import ROOT, run_main, run_stage_in_process
from config import SECTIONS, parse_config
from dataio.fake import write_fake_fashion_mnist
from report_figures.figures import FIGURES
from util.runfiles import read_log

ROWS = ["scratch", "pixel", "ema_wse5"]
SCRIPT_STAGE = {v: k for k, v in SCRIPTS.items()}


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _dry_run(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(["--dry_run", *argv]) == 0
    return [shlex.split(line) for line in buf.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke_plan(cifar_root, tmp_path_factory):
    """Run the smoke plan on ROWS after pixel's pretraining was interrupted after 1 of 2 epochs."""
    base = tmp_path_factory.mktemp("report")
    runs, figs = str(base / "runs"), str(base / "figs")
    common = ["--plan", "report", "--scale", "smoke", "--data_path", cifar_root, "--output_root", runs,
              "--figures_dir", figs, "--quiet"]
    # the pixel pretraining command the runner will issue, stopped by hand after epoch 1 of 2
    cmd = next(c for c in _dry_run(*common, "--only", "pixel") if c[1] == "main_pretrain.py")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run_main("main_pretrain", *cmd[2:], "--epochs", "1")
    finally:
        os.chdir(cwd)
    pre_log = os.path.join(runs, "pixel", "seed0", "pretrain", "log.txt")
    interrupted = _log(pre_log)
    mp = pytest.MonkeyPatch()
    mp.setattr(reproduce, "run_stage", run_stage_in_process)
    try:
        assert reproduce.main([*common, "--only", *ROWS]) == 0
    finally:
        mp.undo()
    return {"runs": runs, "figs": figs, "common": common, "interrupted": interrupted, "pre_log": pre_log}


@pytest.mark.slow
def test_smoke_plan_end_to_end(smoke_plan):
    runs, figs = smoke_plan["runs"], smoke_plan["figs"]
    for row in ROWS:
        stages = ("finetune", "linprobe") if row == "scratch" else ("pretrain", "finetune", "linprobe")
        for st in stages:
            d = os.path.join(runs, row, "seed0", st)
            assert len(_log(os.path.join(d, "log.txt"))) == 2, (row, st)
            if st != "pretrain":
                with open(os.path.join(d, "results.json")) as f:
                    r = json.load(f)
                assert r["epochs"] == 2 and (r["init"] is None) == (row == "scratch")
        assert not os.path.exists(os.path.join(runs, "scratch", "seed0", "pretrain"))
    for f in FIGURES + ("results.md", "results.json", "recon_pixel.png", "featsim_ema_wse5.png"):
        assert os.path.getsize(os.path.join(figs, f)) > 0, f
    with open(os.path.join(figs, "results.md")) as f:
        table = [line for line in f if line.startswith("| ") and not line.startswith("| row")]
    assert sorted(line.split("|")[1].strip() for line in table) == sorted(ROWS)
    assert any("81.1" in line for line in table)  # the report's number beside ours
    # the smoke caps reached the run: ema_wse5 regressed pixels for 1 epoch, then features
    ema = _log(os.path.join(runs, "ema_wse5", "seed0", "pretrain", "log.txt"))
    assert [r["regress"] for r in ema] == ["pixel", "feature"] and ema[1]["target_refreshed"]


def test_interrupted_pretraining_was_continued(smoke_plan):
    log = _log(smoke_plan["pre_log"])
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[0] == smoke_plan["interrupted"][0]  # epoch 0 was not retrained


def test_rerun_skips_finished_stages(smoke_plan, monkeypatch):
    runs = smoke_plan["runs"]
    logs = [os.path.join(dp, "log.txt") for dp, _, fs in os.walk(runs) if "log.txt" in fs]
    before = {p: (os.path.getmtime(p), len(_log(p))) for p in logs}

    def forbidden(cmd, log_file, quiet):
        raise AssertionError(f"stage rerun: {cmd}")

    monkeypatch.setattr(reproduce, "run_stage", forbidden)
    assert reproduce.main([*smoke_plan["common"], "--only", *ROWS, "--no_figures"]) == 0
    assert {p: (os.path.getmtime(p), len(_log(p))) for p in logs} == before


@pytest.mark.slow
def test_stage_without_results_resumes_in_a_subprocess(smoke_plan):
    """A real subprocess: the finished probe lost its results.json; the runner reruns the
    command, the script finds its checkpoint at the last epoch and only rewrites results.json."""
    d = os.path.join(smoke_plan["runs"], "scratch", "seed0", "linprobe")
    os.remove(os.path.join(d, "results.json"))
    before = _log(os.path.join(d, "log.txt"))
    assert reproduce.main([*smoke_plan["common"], "--only", "scratch", "--no_figures"]) == 0
    assert _log(os.path.join(d, "log.txt")) == before
    with open(os.path.join(d, "results.json")) as f:
        assert json.load(f)["epochs"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_dry_run_commands_parse(scale, monkeypatch, tmp_path):
    cmds = _dry_run("--plan", "report", "--scale", scale, "--seeds", "2", "--data_path", str(tmp_path))
    n_rows = len(reproduce.PLANS["report"])
    assert len(cmds) == 2 * (3 * n_rows - 1)  # scratch has no pretraining stage
    monkeypatch.chdir(ROOT)
    seen = {}
    for cmd in cmds:
        assert cmd[0] == "python" and cmd[1] in SCRIPT_STAGE
        stage = SCRIPT_STAGE[cmd[1]]
        cfg = parse_config(SECTIONS[stage], stage, cmd[2:])
        row = cfg.output_dir.split(os.sep)[-3]
        assert cfg.output_dir.endswith(os.path.join(row, f"seed{cfg.seed}", stage))
        assert cfg.data_path == str(tmp_path)
        if stage == "pretrain":
            seen[row] = cfg
            if scale == "full":  # the report's recipe, only the row's parameter varies
                assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.warmup_epochs) == \
                       ("mae_vit_tiny_patch4", 200, 512, 40)
            else:
                assert cfg.epochs == 2 and cfg.model == "mae_vit_smoke_patch4" and cfg.device == "cpu"
        else:
            assert cfg.from_scratch == (row == "scratch")
            assert cfg.epochs == (100 if scale == "full" else 2)
            if row != "scratch":
                assert cfg.finetune == os.path.join(os.path.dirname(os.path.dirname(cfg.output_dir)),
                                                    "seed" + str(cfg.seed), "pretrain", "checkpoint-last.pth")
    if scale == "full":
        assert seen["pixel"].target == "pixel"
        assert [seen[f"mae_k{k}"].k for k in (1, 2, 4, 10, 20)] == [1, 2, 4, 10, 20]
        assert all(seen[f"mae_k{k}"].target == "mae_k" for k in (1, 2, 4, 10, 20))
        assert [(seen[f"ema_wse{w}"].wse, seen[f"ema_wse{w}"].tau) for w in (0, 1, 5, 20, 40, 80)] == \
               [(w, 0.995) for w in (0, 1, 5, 20, 40, 80)]
        assert (seen["ema_tau0.9_wse5"].tau, seen["ema_tau0.9_wse5"].wse) == (0.9, 5)
        assert (seen["ema_tau0.7_wse5"].tau, seen["ema_tau0.7_wse5"].wse) == (0.7, 5)
    else:
        assert seen["ema_wse0"].wse == 0 and seen["ema_wse80"].wse == 1 and seen["mae_k20"].k == 1


@pytest.mark.parametrize("argv,says", [
    (["--device", "foo"], "device must be"),
    (["--output_root", "FILE"], "is a file, not a folder"),
    (["--output_root", "FILE/sub"], "is a file, not a folder"),
    (["--figures_dir", "FILE"], "is a file, not a folder"),
    (["--train_subset", "-1"], "--train_subset must be >= 0"),
    (["--pretrain_epochs", "-3"], "--pretrain_epochs must be >= 0"),
    (["--only", "nope"], "not rows of plan 'report': nope"),
    (["--plan", "study", "--only", "mae_k10"], "not rows of plan 'study': mae_k10"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--seeds", "two"], "invalid int value"),
    (["--plan", "banana"], "invalid choice"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_input_is_one_line_and_exit_2(argv, says, dry_run, tmp_path, capsys, monkeypatch):
    """reproduce.py's own bad input: one line on stderr, exit 2, no usage block, nothing run."""
    file = tmp_path / "a_file"
    file.write_text("")
    monkeypatch.setattr(reproduce, "run_stage", lambda *a: pytest.fail("a stage ran"))
    argv = [a.replace("FILE", str(file)) for a in argv]
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv + (["--dry_run"] if dry_run else []))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and says in err and err.startswith("error: ")
    assert len(err.splitlines()) == 1 and "usage" not in err and "Traceback" not in err
    assert not out


# ---- stop signals: real processes --------------------------------------------------------------
def _wait_for(cond, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _group_gone(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=64, n_test=32)


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["kill-pid", "kill-group"])
def test_stop_signal_is_passed_to_the_stage(to_group, fmnist, tmp_path, monkeypatch, capsys):
    """SIGTERM to reproduce.py alone (kill PID), or to its whole process group (scancel, timeout,
    systemd): the running stage gets it once, saves and exits; reproduce.py exits 143 without
    starting another stage, nothing is left running, and a rerun continues the checkpoint."""
    runs = str(tmp_path / "runs")
    argv = ["--plan", "study", "--scale", "smoke", "--only", "pixel", "--probe_epochs", "1", "--train_subset", "0",
            "--data_path", fmnist, "--output_root", runs, "--quiet"]
    pre = os.path.join(runs, "pixel", "seed0", "pretrain")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "reproduce.py", *argv, "--pretrain_epochs", "1000"], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage_pid = None
    try:
        _wait_for(lambda: read_log(os.path.join(pre, "log.txt"), drop_cut_tail=True), "the first epoch's log line")
        with open(os.path.join(pre, ".lock")) as f:  # "pid N on HOST since ...": the stage's process
            stage_pid = int(f.read().split()[1])
        # its own group: a signal to reproduce.py's group reaches it once, passed on (two would kill it unsaved)
        assert os.getpgid(stage_pid) == stage_pid != proc.pid
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 143, out
        for pgid in (proc.pid, stage_pid):  # reproduce.py's group, and the stage's own
            _wait_for(lambda: _group_gone(pgid), f"process group {pgid} to end", timeout=10)
    finally:  # on a failure: leave nothing running
        for pgid in (proc.pid, stage_pid):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait()
    assert "[reproduce] SIGTERM: stopped pixel seed 0 pretrain (exit 143" in out
    with open(os.path.join(runs, "pixel", "seed0", "pretrain.out")) as f:
        assert "SIGTERM: stopped" in f.read()  # the stage saved (a second signal would have killed it)
    assert not os.path.exists(os.path.join(runs, "pixel", "seed0", "linprobe"))  # no stage started after
    ckpt = torch.load(os.path.join(pre, "checkpoint-last.pth"), weights_only=False)
    before = read_log(os.path.join(pre, "log.txt"))
    # the rerun (in-process, to stay quick) continues the checkpoint and finishes its epoch
    monkeypatch.setattr(reproduce, "run_stage", run_stage_in_process)
    monkeypatch.setattr(reproduce, "write_outputs", lambda args, names: None)
    capsys.readouterr()
    assert reproduce.main([*argv, "--pretrain_epochs", str(ckpt["epoch"] + 1)]) == 0
    resumed = f"resumed from {os.path.join(pre, 'checkpoint-last.pth')} at epoch {ckpt['epoch']}"
    assert resumed in capsys.readouterr().out
    after = read_log(os.path.join(pre, "log.txt"))
    assert [r["epoch"] for r in after] == list(range(ckpt["epoch"] + 1)) and after[:len(before)] == before


def test_malformed_run_file_fails_its_row_and_seed(tmp_path, monkeypatch, capsys):
    """The stage-done check: a cut-off last log line (a killed run) is a stage to run again, whose
    rerun repairs it; any other malformed file fails that row and seed in one line, and the plan
    goes on with the next."""
    runs, pre = tmp_path / "runs", tmp_path / "runs" / "pixel" / "seed0" / "pretrain"
    pre.mkdir(parents=True)
    (pre / "checkpoint-last.pth").write_bytes(b"")
    (pre / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1, "lo')
    assert not reproduce.stage_done("pretrain", str(pre), 2)
    (pre / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    assert reproduce.stage_done("pretrain", str(pre), 2)
    (pre / "log.txt").write_text('3\n{"epoch": 1}\n')
    ran = []
    monkeypatch.setattr(reproduce, "run_stage", lambda cmd, log_file, quiet: ran.append(cmd[0]) or 1)
    assert reproduce.main(["--plan", "report", "--scale", "smoke", "--only", "pixel", "scratch", "--output_root",
                           str(runs), "--data_path", str(tmp_path), "--no_figures"]) == 1
    out = capsys.readouterr().out
    assert f"[reproduce] FAILED: pixel seed 0 pretrain ({pre}/log.txt line 1 is a number, not a JSON object)\n" in out
    assert ran == ["main_finetune.py"]  # scratch's first stage (failed by the stand-in); nothing of pixel
