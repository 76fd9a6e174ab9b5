"""The guarantees as real launchers and real users drive the scripts: a stop sent to the whole
process group (Slurm's scancel, `timeout`, systemd, Ctrl-C) with DataLoader workers running, two
runs started on one directory, a run killed with -9. Real processes, real signals."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SMOKE
import util.signals
from dataio.fake import write_fake_image_folder
from util.signals import StopRequest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(script, out, *args, data):
    """`python SCRIPT --config smoke ...` in a session of its own: its pid is its process group."""
    cmd = [sys.executable, script, "--config", SMOKE, "--data_path", str(data), "--output_dir", str(out),
           "--precision", "fp32", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path, proc, timeout=120.0):
    """Until `path` exists (the run is training past its first epoch), or fail."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def group_gone(pgid, timeout=30.0) -> bool:
    """No process of the group is left (workers included), within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    proc = start("main_pretrain.py", out, "--epochs", "1", "--warmup_epochs", "0", data=cifar_root)
    assert proc.wait(timeout=300) == 0, proc.communicate()
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_fake_image_folder(str(tmp_path_factory.mktemp("folder")), n_per_class=40)


@pytest.mark.slow
@pytest.mark.parametrize("script,sig,extra,data", [
    ("main_finetune.py", signal.SIGTERM, (), "cifar"),  # fine-tuning's torchvision loader
    ("main_pretrain.py", signal.SIGINT, ("--data_loader", "torchvision"), "cifar"),
    ("main_linprobe.py", signal.SIGTERM, ("--dataset", "image_folder", "--data_loader", "torchvision"), "folder"),
])
def test_group_stop_with_workers_saves_and_exits_like_a_stop_of_the_main_process(
        script, sig, extra, data, cifar_root, image_folder, pretrained, tmp_path):
    """`kill -TERM -- -PGID` (and Ctrl-C's SIGINT to the group) with 2 DataLoader workers running:
    the workers ignore it, the main process finishes its step, saves, exits 128 + signal, and
    rerunning the command continues to the end with one log line per epoch."""
    root = image_folder if data == "folder" else cifar_root
    init = () if script == "main_pretrain.py" else ("--finetune", pretrained)
    out = tmp_path / "run"
    args = (*init, *extra, "--num_workers", "2", "--warmup_epochs", "0")
    proc = start(script, out, *args, "--epochs", "200", data=root)
    wait_for(out / "log.txt", proc)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert f"{signal.Signals(sig).name}: stopped" in stdout and "saved" in stdout
    assert "DataLoader worker" not in stderr and "Traceback" not in stderr
    assert group_gone(proc.pid)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    done = ckpt["epoch"] + 1  # the interrupted epoch too
    rerun = start(script, out, *args, "--epochs", done, data=root)
    assert rerun.wait(timeout=300) == 0, rerun.communicate()
    assert epochs_logged(out) == list(range(done))


@pytest.mark.slow
def test_second_run_on_a_directory_is_refused_and_a_killed_run_leaves_no_lock(cifar_root, tmp_path):
    """Two runs on one --output_dir: the second gets one line naming the holder (exit 2) and
    changes nothing; after kill -9 of the first, the next run starts (resuming its checkpoint)."""
    out = tmp_path / "run"
    first = start("main_pretrain.py", out, "--epochs", "200", "--warmup_epochs", "0", data=cifar_root)
    wait_for(out / "log.txt", first)
    second = start("main_pretrain.py", out, "--epochs", "200", "--warmup_epochs", "0", data=cifar_root)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and "is in use by another run" in err
    assert f"pid {first.pid}" in err
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert group_gone(first.pid)
    done = torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"]
    third = start("main_pretrain.py", out, "--epochs", done + 1, "--warmup_epochs", "0", data=cifar_root)
    stdout, stderr = third.communicate(timeout=300)
    assert third.returncode == 0, stderr[-2000:]
    assert f"resumed from {out / 'checkpoint-last.pth'} at epoch {done}" in stdout
    assert epochs_logged(out) == list(range(done + 1))  # every epoch once


@pytest.mark.slow
def test_the_same_stop_delivered_twice_still_saves(cifar_root, tmp_path):
    """systemd's cgroup kill or Slurm's scancel plus reproduce.py's forwarding: two SIGTERMs a
    moment apart are one stop; the run saves and exits 143 rather than dying on the second."""
    out = tmp_path / "run"
    proc = start("main_pretrain.py", out, "--epochs", "200", "--warmup_epochs", "0", data=cifar_root)
    wait_for(out / "log.txt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM: stopped" in stdout, stderr[-2000:]


def test_a_second_stop_after_the_window_kills(monkeypatch):
    """A person pressing Ctrl-C again after waiting: the default action (here recorded, not run)."""
    clock, raised = [100.0], []
    monkeypatch.setattr(util.signals.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(util.signals.signal, "raise_signal", raised.append)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within the window: the same stop
        assert stop.requested and raised == []
        clock[0] += util.signals.DUPLICATE_WINDOW_S + 0.1
        os.kill(os.getpid(), signal.SIGINT)
        assert raised == [signal.SIGINT]
    finally:
        stop.restore()
