"""Targets that are not copies of the online encoder: a kind defines its own width (a new one is
one class in one file), MaskFeat's HOG, and a frozen teacher read from an exported file."""
import json
import math

import pytest
import torch

import target_encoder
import util.trainer
from conftest import run_main, smoke_args
from target_encoder import TARGETS, EMATarget, hog_features, register_target
from test_faults import stop_during_step
from util.signals import StopRequest


def log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def ckpt(out):
    return torch.load(out / "checkpoint-last.pth", weights_only=True)


@pytest.fixture
def doubled_ema():
    """A kind twice as wide as the encoder, added as a forker would: this class, nothing else."""
    @register_target("ema_doubled")
    class DoubledEMATarget(EMATarget):
        """The EMA teacher's features and their squares, side by side: (N, L, 2D)."""
        def feature_dim(self, arch, in_chans):
            return 2 * arch.embed_dim

        def feature_target(self, imgs, encoder=None):
            f = super().feature_target(imgs, encoder)
            return torch.cat([f, f * f], dim=-1)
    yield DoubledEMATarget
    del TARGETS["ema_doubled"]


@pytest.mark.slow
def test_a_kind_of_another_width_pretrains_through_main_pretrain(doubled_ema, cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "ema_doubled", "--precision", "fp32"))
    head = ckpt(tmp_path)["model"]["decoder_pred_feat.weight"]
    assert head.shape == (2 * 64, 64)  # (2 x the smoke encoder's 64, the decoder's 64)
    assert [r["regress"] for r in log(tmp_path)] == ["pixel", "feature"]
    assert all(math.isfinite(r["loss"]) for r in log(tmp_path))


# ---- HOG -----------------------------------------------------------------------------------

def ramp(direction: str, n=2, c=3, size=32):
    """Images whose brightness grows along x or y: every gradient points one way."""
    t = torch.arange(size, dtype=torch.float32) / size
    img = t.view(1, size) if direction == "x" else t.view(size, 1)
    return img.expand(size, size).repeat(n, c, 1, 1)


@pytest.mark.parametrize("patch", [4, 16])
def test_hog_puts_a_ramp_in_its_orientation_bin_per_cell_and_channel(patch):
    hog = hog_features(ramp("x"), patch)  # (N, L, C * 4 cells * 9 bins)
    assert hog.shape == (2, (32 // patch) ** 2, 3 * 4 * 9)
    cells = hog.reshape(2, -1, 3, 4, 9)
    assert torch.allclose(cells.norm(dim=-1), torch.ones(()), atol=1e-5)  # L2-normalised per cell
    assert torch.allclose(cells[..., 0], torch.ones(())) and cells[..., 1:].abs().max() < 1e-6  # angle 0
    vertical = hog_features(ramp("y"), patch).reshape(2, -1, 3, 4, 9)
    # angle pi/2 sits at bin 4.5: split evenly between bins 4 and 5
    assert torch.allclose(vertical[..., 4], vertical[..., 5]) and vertical[..., 4].min() > 0.7


def test_hog_ignores_brightness_scale_and_sees_each_channel():
    img = torch.rand(2, 3, 32, 32)
    assert torch.allclose(hog_features(img, 4), hog_features(3 * img + 1, 4), atol=1e-5)
    flat = img.clone()
    flat[:, 1] = 0.5  # a flat channel has no gradient: its histograms are zero
    cells = hog_features(flat, 4).reshape(2, -1, 3, 4, 9)
    assert cells[:, :, 1].abs().max() == 0 and cells[:, :, 0].abs().max() > 0


def test_hog_is_float32_under_bf16_autocast():
    img = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hog_features(img, 4)
    assert out.dtype == torch.float32 and torch.allclose(out, hog_features(img, 4))


@pytest.mark.slow
def test_hog_pretrains_then_finetunes_probes_and_exports(cifar_root, tmp_path):
    pre = tmp_path / "pre"
    run_main("main_pretrain", *smoke_args(cifar_root, pre, "--target", "hog", "--precision", "fp32"))
    records = log(pre)
    assert [r["regress"] for r in records] == ["feature", "feature"] and records[1]["loss"] < records[0]["loss"]
    assert ckpt(pre)["model"]["decoder_pred_feat.weight"].shape[0] == 3 * 4 * 9 and ckpt(pre)["target"] is None
    assert (pre / "encoder.safetensors").is_file() and not (pre / "target_encoder.safetensors").exists()
    run_main("main_finetune", *smoke_args(cifar_root, tmp_path / "ft", "--finetune", pre / "checkpoint-last.pth",
                                          "--epochs", 1, "--warmup_epochs", 0))
    run_main("main_linprobe", *smoke_args(cifar_root, tmp_path / "lp", "--finetune", pre / "checkpoint-last.pth",
                                          "--epochs", 1, "--warmup_epochs", 0, "--knn"))
    for run in ("ft", "lp"):
        assert 0 <= json.loads((tmp_path / run / "results.json").read_text())["best_acc1"] <= 100


# ---- a teacher from a file ------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_run(cifar_root, tmp_path_factory):
    """A `random` run: its target_encoder.safetensors is the frozen random-init encoder."""
    out = tmp_path_factory.mktemp("random")
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "random", "--precision", "fp32"))
    return out


@pytest.mark.slow
def test_teacher_from_the_random_runs_file_equals_the_random_run(random_run, cifar_root, tmp_path):
    """The loader's check: the random teacher, written out and read back as --teacher, trains
    exactly as --target random did (same seed, same student init, same targets)."""
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "teacher", "--precision", "fp32",
                                          "--teacher", random_run / "target_encoder.safetensors"))
    assert [r["loss"] for r in log(tmp_path)] == pytest.approx([r["loss"] for r in log(random_run)], rel=1e-6)
    a, b = ckpt(random_run)["model"], ckpt(tmp_path)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_teacher_of_another_width_and_input_size(cifar_root, tmp_path, capsys):
    """A wider teacher (the report's tiny encoder, 192 wide) trained at 32x32, for a student at
    64x64 on the same 16x16 grid... of patch 4 at 64: its positions are resampled 8x8 -> 16x16."""
    teacher = tmp_path / "teacher"
    run_main("main_pretrain", *smoke_args(cifar_root, teacher, "--model", "mae_vit_tiny_patch4", "--epochs", 1,
                                          "--warmup_epochs", 0, "--batch_size", 16, "--precision", "fp32"))
    capsys.readouterr()
    out = tmp_path / "student"
    run_main("main_pretrain", *smoke_args(cifar_root, out, "--target", "teacher", "--precision", "fp32",
                                          "--input_size", 64, "--epochs", 1, "--warmup_epochs", 0,
                                          "--teacher", teacher / "encoder.safetensors"))
    assert "position embeddings interpolated from 8x8 to 16x16" in capsys.readouterr().out
    assert ckpt(out)["model"]["decoder_pred_feat.weight"].shape[0] == 192
    assert len(ckpt(out)["teacher_sha256"]) == 64 and math.isfinite(log(out)[0]["loss"])


def test_teacher_on_another_grid_is_one_line(random_run, cifar_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "x", "--target", "teacher",
                                              "--model", "mae_vit_smoke_patch16",
                                              "--teacher", random_run / "target_encoder.safetensors"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "gives a 8x8 grid, mae_vit_smoke_patch16's is 2x2" in err and not (tmp_path / "x").exists()


def test_a_changed_teacher_file_is_refused_on_resume(random_run, cifar_root, tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((random_run / "target_encoder.safetensors").read_bytes())
    args = ("--target", "teacher", "--teacher", teacher, "--precision", "fp32")
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "run", *args, "--epochs", 1, "--warmup_epochs", 0))
    teacher.write_bytes((random_run / "encoder.safetensors").read_bytes())  # same shape, other weights
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "run", *args, "--epochs", 2,
                                              "--warmup_epochs", 0))
    assert e.value.code == 2 and "not the file this run was trained with" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hog", "teacher"])
def test_stop_mid_epoch_then_resume_equals_uninterrupted(kind, random_run, cifar_root, tmp_path, monkeypatch):
    args = ("--target", kind, "--epochs", 2, "--precision", "fp32",
            *(("--teacher", random_run / "target_encoder.safetensors") if kind == "teacher" else ()))
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "straight", *args))
    monkeypatch.setattr(util.trainer, "StopRequest", stop_during_step(5 + 1 + 2))
    with pytest.raises(SystemExit):
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "stopped", *args))
    assert ckpt(tmp_path / "stopped")["epoch_step"] == 2
    monkeypatch.setattr(util.trainer, "StopRequest", StopRequest)
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "stopped", *args))
    a, b = ckpt(tmp_path / "straight")["model"], ckpt(tmp_path / "stopped")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hog", "teacher"])
def test_compiled_run_of_each_new_kind(kind, random_run, cifar_root, tmp_path):
    args = ("--target", kind, "--epochs", 1, "--warmup_epochs", 0, "--precision", "fp32", "--compile",
            *(("--teacher", random_run / "target_encoder.safetensors") if kind == "teacher" else ()))
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, *args))
    [record] = log(tmp_path)
    assert math.isfinite(record["loss"]) and record["compiled_graphs"] >= 1


@pytest.mark.slow
def test_feature_similarity_of_a_hog_run_is_computed(cifar_root, tmp_path):
    """The report's figure of target similarity reads any kind's target (no teacher network)."""
    from report_figures.model_figures import feature_similarity_figure
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "hog", "--precision", "fp32",
                                          "--epochs", 1, "--warmup_epochs", 0))
    sim = feature_similarity_figure(str(tmp_path / "checkpoint-last.pth"), str(tmp_path / "sim.png"))
    assert sim is not None and -1 <= sim <= 1 and (tmp_path / "sim.png").is_file()

