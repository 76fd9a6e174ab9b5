"""Several machines (docs/MULTINODE.md): two torchrun launchers on this machine play two nodes
(--nnodes 2, one process each, c10d rendezvous on 127.0.0.1, gloo on the CPU) and must train as
one process with their summed batch does; and the ImageNet presets parse."""
import glob
import os
import socket
import subprocess
import sys
import uuid

import pytest
import torch

import util.trainer
from conftest import ROOT, SMOKE, run_main, smoke_args
from test_faults import stop_during_step

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "imagenet", "*.yaml")))
# One epoch, the EMA target from its first step (updated per step): every kind of state moves.
ARGS = ["--target", "ema", "--wse", "0", "--ema_every", "step", "--tau", "0.8", "--epochs", "1",
        "--precision", "fp32"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one intra-op thread: on a busy 2-core machine two threads wait on
    each other (the smoke model's steps measured 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for the rendezvous endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, port: int, run_id: str, *args) -> list:
    """One "node": a torchrun launcher with one worker joining a 2-node c10d rendezvous.
    (--node_rank is only read by the static rendezvous; c10d ranks nodes by arrival.)"""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", run_id, "--rdzv_conf", "join_timeout=120", "main_pretrain.py", *args]


@pytest.mark.slow
def test_two_nodes_train_as_one_process_with_their_summed_batch(cifar_root, tmp_path):
    """2 nodes x batch 8 x accum_iter 2 against 1 process x batch 16 x accum_iter 2: each
    optimizer step sees the same 32 images with the same masks and augmentations (the in-memory
    loader and the mask noise draw for the global micro-batch, each rank keeping its rows), so
    only float summation order differs, as in tests/test_distributed.py, whose tolerance this
    keeps (2e-3; measured here: max |diff| 2.3e-5 over model and target, 5 steps at lr 1.25e-3;
    a weight moves by about lr per AdamW step). The micro-batches run under DDP's no_sync and the
    last one all-reduces: a missing all-reduce would leave each rank with its own gradients."""
    two, one = tmp_path / "two", tmp_path / "one"
    common = ["--config", SMOKE, "--data_path", cifar_root, "--accum_iter", "2", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port, run_id = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    nodes = [subprocess.Popen(node(r, port, run_id, *common, "--output_dir", str(two), "--batch_size", "8"),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = []
    try:  # the one-process run meanwhile, in this process (one import of torch fewer)
        run_main("main_pretrain", *common, "--output_dir", one, "--batch_size", "16")
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    # One group of two ranks, not two runs of one: only the global rank 0 prints and writes.
    assert sum("done:" in out for out, _ in outs) == 1
    a = torch.load(one / "checkpoint-last.pth", weights_only=True)
    b = torch.load(two / "checkpoint-last.pth", weights_only=True)
    assert a["config"]["lr"] == b["config"]["lr"]  # blr x 8 x 2 x 2 ranks / 256 = blr x 16 x 2 / 256
    assert a["step"] == b["step"] == 5  # 160 images / 32 per optimizer step
    assert b["target"] is not None
    diffs = {f"{key}.{name}": (t - b[key][name]).abs().max().item() for key in ("model", "target")
             for name, t in a[key].items()}
    assert max(diffs.values()) < 2e-3, max(diffs.items(), key=lambda kv: kv[1])
    assert len((two / "log.txt").read_text().splitlines()) == 1


def test_a_mid_epoch_checkpoint_continues_only_with_its_process_count(cifar_root, tmp_path, monkeypatch, capsys):
    """Machines lost (or added) after a stop inside an epoch: that epoch's remaining batches are
    sharded for the old count, so continuing is refused in one line; epoch ends are free."""
    out = tmp_path / "run"
    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(2))  # epoch 0, after step 2
    with pytest.raises(SystemExit):
        run_main("main_pretrain", *smoke_args(cifar_root, out))
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch_step"], ckpt["world_size"]) == (2, 1)
    ckpt["world_size"] = 16  # as if written by 2 machines x 8 GPUs
    torch.save(ckpt, out / "checkpoint-last.pth")
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, out))
    assert e.value.code == 2
    assert "stopped inside epoch 0 (batch 2) with 16 processes; finish that epoch with 16" in capsys.readouterr().err


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_imagenet_presets_parse(path):
    """Every key of every section a preset holds is known, typed and valid. Models the registries
    do not hold yet (the patch-16 family) are swapped for a registered one, so the rest of the
    file is still checked; test_imagenet_preset_models_exist says whether they do."""
    import models_mae
    import models_vit
    from config import SECTIONS, parse_config, read_yaml
    raw = read_yaml(path)
    sections = [s for s in SECTIONS if s in raw] or ["pretrain"]
    for section in sections:
        model = raw.get(section, {}).get("model", raw.get("model", ""))
        registry = models_mae.MODELS if section == "pretrain" else models_vit.MODELS
        swap = ["--model", next(iter(registry))] if model and model not in registry else []
        cfg = parse_config(SECTIONS[section], section, ["--config", path, "--device", "cpu", *swap])
        assert cfg.input_size == 224 and cfg.dataset == "image_folder"


def test_imagenet_preset_models_exist():
    import models_mae
    import models_vit
    from config import read_yaml
    names = {(s, read_yaml(p).get(s, {}).get("model")) for p in PRESETS for s in ("pretrain", "finetune", "linprobe")}
    missing = sorted(n for s, n in names if n and n not in (models_mae.MODELS if s == "pretrain" else models_vit.MODELS))
    if missing:
        pytest.skip(f"not registered yet (models_mae.py / models_vit.py): {', '.join(missing)}")
    assert PRESETS
