"""The one run loop (util/trainer.py): its bookkeeping, shared by pretraining, fine-tuning, probing.

Fine-tuning from scratch is the cheapest script that runs the whole loop; pretraining runs it too
(tests/test_faults.py, tests/test_pretrain.py).
"""
import ast
import errno
import glob
import json
import os
import signal

import pytest
import torch

import util.trainer
from conftest import ROOT, run_main, smoke_args, sigterm_during
from engine_finetune import Classification
from engine_pretrain import Pretraining

FT = ("--from_scratch", "--epochs", "2", "--warmup_epochs", "1", "--aa", "", "--reprob", "0")
TIME_KEYS = {"time", "seconds", "images_per_s"}


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def finetune(cifar_root, out, *extra):
    run_main("main_finetune", *smoke_args(cifar_root, out, *FT, *extra))


def sigterm_at_step(monkeypatch, n: int):
    sigterm_during(monkeypatch, Classification, n)


def test_sigterm_saves_then_exits_128_plus_signal(cifar_root, tmp_path, monkeypatch, capsys):
    sigterm_at_step(monkeypatch, 6)  # epoch 1, step 1 (5 steps an epoch)
    with pytest.raises(SystemExit) as e:
        finetune(cifar_root, tmp_path)
    assert e.value.code == 128 + signal.SIGTERM
    assert "SIGTERM: stopped at epoch 1, step 2" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.slow
def test_interrupted_epoch_logs_what_an_uninterrupted_one_does(cifar_root, tmp_path, monkeypatch):
    finetune(cifar_root, tmp_path / "straight")
    sigterm_at_step(monkeypatch, 6)
    with pytest.raises(SystemExit):
        finetune(cifar_root, tmp_path / "stopped")
    monkeypatch.undo()
    finetune(cifar_root, tmp_path / "stopped")
    a, b = read_log(tmp_path / "straight"), read_log(tmp_path / "stopped")
    assert [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in set(ra) - TIME_KEYS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_crash_after_the_commit_point_is_completed_by_a_rerun(cifar_root, tmp_path, monkeypatch):
    """Killed after checkpoint-last.pth marks the run finished but before checkpoint-2.pth, the
    last log line and results.json exist: the rerun writes what is missing."""
    real = util.trainer.Run._write_outputs

    def die_at_the_end(self, record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt
        real(self, record)
    monkeypatch.setattr(util.trainer.Run, "_write_outputs", die_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        finetune(cifar_root, tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "checkpoint-2.pth").exists() and len(read_log(tmp_path)) == 1
    finetune(cifar_root, tmp_path)  # the same command again
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]
    assert torch.load(tmp_path / "checkpoint-2.pth", weights_only=True)["epoch"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_directory_squatting_on_a_checkpoint_is_one_line_then_rerun_completes(cifar_root, tmp_path, capsys):
    (tmp_path / "checkpoint-2.pth").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        finetune(cifar_root, tmp_path)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "could not write" in err and len(err.splitlines()) == 1
    (tmp_path / "checkpoint-2.pth").rmdir()
    finetune(cifar_root, tmp_path)
    assert os.path.isfile(tmp_path / "checkpoint-2.pth") and len(read_log(tmp_path)) == 2


@pytest.mark.slow
def test_disk_full_is_one_line_and_leaves_no_temporary_files(cifar_root, tmp_path, monkeypatch, capsys):
    finetune(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0")
    good = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    real_save = torch.save

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as e:
        finetune(cifar_root, tmp_path, "--warmup_epochs", "0")
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "No space left on device" in err and len(err.splitlines()) == 1
    assert not glob.glob(str(tmp_path / "*.tmp*")) and not glob.glob(str(tmp_path / ".write_probe*"))
    after = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == good["epoch"] == 1


def test_stale_temporary_files_of_killed_runs_are_swept(cifar_root, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    for name in (f"checkpoint-last.pth.tmp{dead}", f".write_probe{dead}", f"config.yaml.tmp{dead}"):
        (tmp_path / name).write_bytes(b"x")
    keep = tmp_path / "notes.tmp.txt"
    keep.write_text("mine")
    finetune(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0")
    assert sorted(p.name for p in tmp_path.glob("*tmp*")) == ["notes.tmp.txt"]
    assert not list(tmp_path.glob(".write_probe*"))


@pytest.mark.slow
def test_foreign_resume_into_a_directory_holding_another_run_is_refused(cifar_root, tmp_path, capsys):
    finetune(cifar_root, tmp_path / "a", "--epochs", "1", "--warmup_epochs", "0")
    finetune(cifar_root, tmp_path / "b", "--epochs", "1", "--warmup_epochs", "0", "--seed", "1")
    before = (tmp_path / "b" / "log.txt").read_text()
    with pytest.raises(SystemExit) as e:
        finetune(cifar_root, tmp_path / "b", "--resume", tmp_path / "a" / "checkpoint-last.pth")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "already holds another run" in err and len(err.splitlines()) == 1
    assert (tmp_path / "b" / "log.txt").read_text() == before


@pytest.mark.slow
@pytest.mark.parametrize("config_yaml", [None, "", "seed: [unterminated"])
def test_guard_reads_the_checkpoint_not_config_yaml(cifar_root, tmp_path, capsys, config_yaml):
    """config.yaml missing, emptied or torn by a kill: the checkpoint's config still guards the run."""
    finetune(cifar_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0")
    cfg = tmp_path / "config.yaml"
    cfg.unlink()
    if config_yaml is not None:
        cfg.write_text(config_yaml)
    with pytest.raises(SystemExit) as e:
        finetune(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0", "--blr", "0.5")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "blr: 0.01 -> 0.5" in err
    finetune(cifar_root, tmp_path, "--epochs", "2", "--warmup_epochs", "0")  # the same run continues
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1] and "blr: 0.01" in cfg.read_text()


def test_fine_tuning_seeds_each_rank_pretraining_draws_one_global_mask():
    from util.runtime import epoch_seed
    from dataio.loader import seeded_generator
    assert Classification.seed_per_rank and not Pretraining.seed_per_rank
    assert epoch_seed(0, 3, rank=0) != epoch_seed(0, 3, rank=1)
    g0, g1 = seeded_generator(0, 3, rank=0), seeded_generator(0, 3, rank=1)
    assert not torch.equal(torch.rand(8, generator=g0), torch.rand(8, generator=g1))


def _functions(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _sources():
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("tests", "output", "__pycache__")]
        yield from (os.path.join(d, f) for f in files if f.endswith(".py"))


def test_one_epoch_loop_and_short_functions():
    loops = [p for p in _sources() if "for epoch in range(" in open(p, encoding="utf-8").read()]
    assert [os.path.relpath(p, ROOT) for p in loops] == [os.path.join("util", "trainer.py")]
    long = [f"{os.path.relpath(p, ROOT)}:{n.name}" for p in _sources() for n in _functions(p)
            if n.end_lineno - n.lineno + 1 > 60]
    assert not long
