"""Counted pretraining compute (util/flops.py, report_figures/flops.py): what the schedule plan's
equal-FLOPs comparison and gpu_check's MFU rest on."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models_mae import create_model
from report_figures.flops import COUNT_BATCH, pretrain_flops, step_flops

BATCH = 2 * COUNT_BATCH  # counted on COUNT_BATCH images and scaled: the check below holds only if that is exact
BASE = dict(model="mae_vit_smoke_patch4", dataset="fashion_mnist", batch_size=BATCH, epochs=3, warmup_epochs=1,
            input_size=32)


def test_a_feature_step_adds_exactly_the_target_pass_and_the_wider_head():
    pixel = step_flops({**BASE, "target": "pixel"}, 0)
    ema = {**BASE, "target": "ema", "wse": 1}
    assert step_flops(ema, 0) == pixel  # before the switch an EMA-MAE step is a pixel-MAE step
    model = create_model(BASE["model"], img_size=32, in_chans=1)  # Fashion-MNIST: one channel
    with torch.no_grad(), FlopCounterMode(display=False) as teacher:
        model.encoder.forward_features(torch.randn(BATCH, 1, 32, 32))
    # the pixel head predicts p*p*C = 16 values per token, the feature head D = 64, on all L tokens;
    # a Linear's forward + backward is 3 matmuls of 2*N*L*in*out FLOPs
    (out_pix, dec_dim), (out_feat, _) = model.decoder_pred.weight.shape, model.decoder_pred_feat.weight.shape
    tokens = BATCH * (32 // 4) ** 2
    heads = 3 * 2 * tokens * dec_dim * (out_feat - out_pix)
    assert step_flops(ema, 1) - pixel == teacher.get_total_flops() + heads
    assert step_flops({**BASE, "target": "mae_k", "k": 1}, 1) == step_flops(ema, 1)  # same teacher pass


def test_a_run_sums_its_epochs_by_phase_and_counts_a_repeated_epoch_once():
    cfg = {**BASE, "target": "ema", "wse": 1}
    pix, feat = step_flops(cfg, 0), step_flops(cfg, 1)
    assert feat > pix
    log = [{"epoch": 0, "step": 5, "regress": "pixel"}, {"epoch": 1, "step": 10, "regress": "feature"},
           {"epoch": 1, "step": 10, "regress": "feature"},  # a resumed run logs its epoch again
           {"epoch": 2, "step": 15, "regress": "feature"}]
    assert pretrain_flops(cfg, log) == pytest.approx(5 * pix + 10 * feat)
    # --accum_iter 2: the log counts optimizer steps, each of two batches
    assert pretrain_flops({**cfg, "accum_iter": 2}, log) == pytest.approx(2 * (5 * pix + 10 * feat))
    assert pretrain_flops(cfg, [{"epoch": 0, "loss": 1.0}]) is None  # a log without steps: unknown
