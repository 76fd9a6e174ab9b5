"""Shared fixtures: a generated CIFAR-format dataset and in-process runs of the scripts."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")

from dataio.fake import write_fake_cifar10  # noqa: E402

# 2 threads on the 2-core CI machine; TEST_THREADS=1 when the cores are shared (an oversubscribed
# 2-thread process can run 10x+ slower than a 1-thread one).
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A tiny CIFAR-10 in the real on-disk format: 5 x 32 train images, 64 test images."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(str(root), per_batch=32, test_size=64)
    return str(root)


@pytest.fixture(scope="session")
def teacher_file(cifar_root, tmp_path_factory):
    """An encoder.safetensors of the smoke model written by a `random` run (its frozen
    random-init teacher): what `--target teacher` reads in tests."""
    out = tmp_path_factory.mktemp("teacher")
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "random", "--epochs", 1,
                                          "--warmup_epochs", 0, "--precision", "fp32"))
    return str(out / "target_encoder.safetensors")


def kind_options(name, teacher_file):
    """Config values a kind needs besides its name (Target.requires): the teacher's file."""
    from target_encoder import TARGETS
    return {"teacher": teacher_file} if "teacher" in TARGETS[name].requires else {}


def run_main(module, *args):
    """Run a script's main() in-process; returns nothing, raises SystemExit on bad input."""
    import importlib
    mod = importlib.import_module(module)
    mod.main(list(map(str, args)))


def smoke_args(cifar_root, out, *extra):
    return ["--config", SMOKE, "--data_path", cifar_root, "--output_dir", str(out), *extra]


def run_stage_in_process(cmd, log_file, quiet):
    """Stand-in for reproduce.run_stage: the script's main() in this process, cwd = repo root."""
    import importlib
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        importlib.import_module(cmd[0][:-3]).main(cmd[1:])
        return 0
    except SystemExit as e:
        return e.code or 0
    finally:
        os.chdir(cwd)


def sigterm_during(monkeypatch, engine_cls, n: int):
    """Deliver a real SIGTERM to this process during the n-th call (0-based, over the run) of
    engine_cls.train_step (one batch; a micro-batch under --accum_iter)."""
    import signal
    real, calls = engine_cls.train_step, {"n": 0}

    def step(self, batch, info):
        out = real(self, batch, info)
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        calls["n"] += 1
        return out
    monkeypatch.setattr(engine_cls, "train_step", step)
