"""--accum_iter K (gradient accumulation, as official MAE): K micro-batches of B train as one
batch of K*B would.

Why the comparisons hold exactly (up to float summation order): the smoke model has no dropout
or drop path, the fixed loader below yields the same images in the same order with no
augmentation, and the masks come from one torch stream drawn per micro-batch, which on the CPU
gives the same numbers for rand(B) twice as for rand(2B) once. The optimizer is SGD where the
gradient's scale must show (AdamW is nearly blind to a gradient scaled by K, the 1/K bug the
test exists for); a run with the 1/K removed is shown to fail the same comparison.
"""
import os
import signal

import pytest
import torch

import engine_pretrain
import models_vit
from conftest import run_main, smoke_args, sigterm_during
from config import FinetuneConfig, PretrainConfig
from dataio.datasets import load_dataset
from engine_finetune import Classification
from engine_pretrain import Pretraining
from util.trainer import Run, Step, optimizer_steps

CPU = torch.device("cpu")
MEAN, STD = (0.5,) * 3, (0.25,) * 3


class FixedLoader:
    """The first sum(sizes) images, in order, in batches of `sizes`, every epoch: no shuffle, no
    augmentation, so micro-batches of B and batches of 2B hold exactly the same images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sizes):
        self.batches, at = [], 0
        for n in sizes:
            self.batches.append((images[at:at + n], labels[at:at + n]))
            at += n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny steps gain nothing from two, and on a busy 2-core machine
    two threads wait on each other (measured here: 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(cifar_root):
    """The fake CIFAR-10 training images, normalised, as (N, 3, 32, 32) float32 and labels."""
    images, labels, _ = load_dataset("cifar10", cifar_root, train=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.from_numpy(labels), images


def weights(engine) -> dict:
    model = engine.model if isinstance(engine, Pretraining) else engine.module
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = getattr(engine, "target", None)
    if target is not None and target.encoder is not None:
        out.update({"target." + k: v.detach().clone() for k, v in target.encoder.state_dict().items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def sgd(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9)


def pretrain(data, tmp_path, name, sizes, accum, optimizer="sgd", **options):
    """A pretraining run through util.trainer.Run on FixedLoader(sizes); returns (engine, run)."""
    x, y, images = data
    cfg = PretrainConfig(**{**dict(model="mae_vit_smoke_patch4", epochs=2, warmup_epochs=1, lr=0.05,
                                   accum_iter=accum, batch_size=sizes[0], print_freq=1, save_freq=1,
                                   device="cpu", precision="fp32", output_dir=str(tmp_path / name)), **options})
    cfg.resolve()
    os.makedirs(cfg.output_dir, exist_ok=True)
    loader = FixedLoader(x, y, sizes)
    torch.manual_seed(0)  # the same initial weights in every run
    engine = engine_pretrain.build_engine(cfg, CPU, (images, y.numpy(), 10), MEAN, STD,
                                        optimizer_steps(len(loader), accum))
    if optimizer == "sgd":
        engine.optimizer = sgd(engine.model, cfg)
    engine.initial = weights(engine)
    run = Run(cfg, engine, loader)
    run.fit()
    return engine, run


EMA_STEP = dict(target="ema", wse=0, ema_every="step", tau=0.8, tau_end=0.95)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(target="pixel"), EMA_STEP], ids=["pixel", "ema_step"])
def test_micro_batches_of_b_times_2_train_as_batches_of_2b(data, tmp_path, options):
    """2 epochs of 8 x 8 images: accum 2 (4 optimizer steps an epoch) against 4 x 16, accum 1.
    ema_step: the per-step EMA moves once per optimizer step, on the annealed tau of that step."""
    big, _ = pretrain(data, tmp_path, "big", [16] * 4, 1, **options)
    acc, run = pretrain(data, tmp_path, "acc", [8] * 8, 2, **options)
    assert run.state.step == 2 * 4  # optimizer steps = batches / accum_iter
    # Measured: max |diff| 1.2e-7 (float summation order: two sums of 8 against one of 16)
    assert max_diff(weights(acc), weights(big)) < 1e-5
    trained = weights(big)
    assert max_diff({k: trained[k] for k in big.initial}, big.initial) > 1e-3  # it moved: not trivially equal

def test_without_the_1_over_k_scale_the_comparison_fails(data, tmp_path, monkeypatch):
    """The test above can fail: summing the K losses unscaled doubles every SGD step."""
    big, _ = pretrain(data, tmp_path, "big", [16] * 4, 1, target="pixel")
    monkeypatch.setattr(Step, "loss_scale", property(lambda self: 1.0))
    acc, _ = pretrain(data, tmp_path, "acc", [8] * 8, 2, target="pixel")
    assert max_diff(weights(acc), weights(big)) > 1e-3


@pytest.mark.slow
def test_adamw_counts_one_step_per_group_and_the_lr_follows_optimizer_steps(data, tmp_path):
    """The real optimizer: AdamW's own step count is batches / K; lr set at each group's start
    gives the schedule of the big-batch run (epoch + i/n at i = 0, 2, 4, 6 of 8 = 0, 1, 2, 3 of 4)."""
    big, _ = pretrain(data, tmp_path, "big", [16] * 4, 1, optimizer="adamw", target="pixel")
    acc, run = pretrain(data, tmp_path, "acc", [8] * 8, 2, optimizer="adamw", target="pixel")
    counts = {int(s["step"]) for s in acc.optimizer.state_dict()["state"].values()}
    assert counts == {2 * 4} and run.state.step == 8
    assert acc.optimizer.param_groups[0]["lr"] == big.optimizer.param_groups[0]["lr"]
    # Adam divides by sqrt(v): where a gradient element is near 0, summation-order noise flips its
    # sign and moves that weight by up to lr a step. Measured: mean |diff| 2.2e-7 (weights moved by
    # 0.1 on average), max 3.0e-3 (lr 0.05). The mean carries the test; the max bounds the outliers.
    a, b = weights(acc), weights(big)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.mean() < 1e-5 and diffs.max() < 2e-2, (diffs.mean(), diffs.max())


def test_an_epoch_not_a_multiple_of_k_flushes_its_last_shorter_group(data, tmp_path):
    """5 micro-batches of 8, K = 2: groups of 2, 2, 1 (the last scaled by 1/1) train as batches
    of 16, 16, 8. Constant lr: the two runs' lr clocks (i/5 against i/3) differ by design."""
    const = dict(target="pixel", warmup_epochs=0, min_lr=0.05)
    big, _ = pretrain(data, tmp_path, "big", [16, 16, 8], 1, **const)
    acc, run = pretrain(data, tmp_path, "acc", [8] * 5, 2, **const)
    assert run.state.step == 2 * optimizer_steps(5, 2) == 6
    assert max_diff(weights(acc), weights(big)) < 1e-5


def classification(data, tmp_path, name, sizes, accum):
    """Fine-tuning (engine_finetune.Classification) on FixedLoader(sizes), SGD, gradient clipping."""
    x, y, _ = data
    cfg = FinetuneConfig(model="vit_smoke_patch4", epochs=2, warmup_epochs=1, lr=0.05, accum_iter=accum,
                         batch_size=sizes[0], drop_path=0.0, smoothing=0.0, clip_grad=0.5, print_freq=1,
                         device="cpu", precision="fp32", output_dir=str(tmp_path / name))
    os.makedirs(cfg.output_dir, exist_ok=True)
    torch.manual_seed(0)
    model = models_vit.create_model(cfg.model, num_classes=10, global_pool=True, drop_path_rate=0.0)
    engine = Classification(cfg, "finetune", model, model, sgd(model, cfg), torch.nn.CrossEntropyLoss(),
                            [(x[:16], y[:16])])
    Run(cfg, engine, FixedLoader(x, y, sizes)).fit()
    return engine


def test_fine_tuning_accumulates_and_clips_the_summed_gradient(data, tmp_path):
    """clip_grad 0.5 binds here: clipping each micro-batch, or before the sum, would differ."""
    big = classification(data, tmp_path, "big", [16] * 4, 1)
    acc = classification(data, tmp_path, "acc", [8] * 8, 2)
    assert max_diff(weights(acc), weights(big)) < 1e-5
    assert acc.best == big.best


def test_a_bad_micro_batch_skips_its_whole_optimizer_step(data, tmp_path, monkeypatch):
    """--skip_nonfinite with K = 2: a NaN in the first micro-batch of a group: that group takes
    no optimizer step (the NaN is already in the summed gradient), the others do, and the
    weights stay finite."""
    real_loss, losses, steps = Pretraining.train_step, [0], [0]
    real_step = torch.optim.SGD.step

    def poisoned(self, batch, step):
        losses[0] += 1
        if losses[0] != 3:  # the 3rd call: epoch 0, micro-batch 2 = the first of group 2
            return real_loss(self, batch, step)
        loss = self.target.loss
        self.target.loss = lambda *a: (lambda value, stats: (value * float("nan"), stats))(*loss(*a))
        try:
            return real_loss(self, batch, step)
        finally:
            self.target.loss = loss

    def counted(self, *args, **kwargs):
        steps[0] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(Pretraining, "train_step", poisoned)
    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    acc, run = pretrain(data, tmp_path, "acc", [8] * 8, 2, target="pixel", skip_nonfinite=1)
    assert steps[0] == 2 * 4 - 1  # group 2 of epoch 0 did not step: neither of its two batches
    assert run.guard.skipped == 1 and run.state.step == 8
    assert all(torch.isfinite(t).all() for t in weights(acc).values())

def sigterm_at_batch(monkeypatch, n: int):
    sigterm_during(monkeypatch, Pretraining, n)


@pytest.mark.slow
def test_a_stop_waits_for_the_group_end_and_resumes_exactly(cifar_root, tmp_path, monkeypatch, capsys):
    """main_pretrain --accum_iter 2 (smoke: 5 batches an epoch = groups 2, 2, 1): a SIGTERM in
    the first micro-batch of epoch 1 checkpoints after its second; the rerun equals a straight run."""
    args = ("--accum_iter", "2", "--target", "ema", "--wse", "1", "--ema_every", "step", "--tau", "0.8",
            "--epochs", "3")
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "straight", *args))
    sigterm_at_batch(monkeypatch, 5)
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, out, *args))
    assert e.value.code == 128 + signal.SIGTERM
    assert "stopped at epoch 1, step 2" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (1, 2, 3 + 1)
    monkeypatch.undo()
    run_main("main_pretrain", *smoke_args(cifar_root, out, *args))
    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert a["step"] == b["step"] == 3 * 3
    assert a["config"]["lr"] == pytest.approx(0.01 * 32 * 2 / 256)  # blr x batch x accum_iter / 256
    for key in ("model", "target"):
        for name, t in a[key].items():
            assert torch.allclose(t, b[key][name], atol=1e-6), (key, name)
