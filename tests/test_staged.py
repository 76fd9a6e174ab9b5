"""dBOT's staged teachers: --target staged (random-init teacher, then a snapshot every K epochs)
and --stage_reset (the student restarts from a fresh initialisation at each new stage)."""
import json

import pytest
import torch

from config import PretrainConfig
from conftest import run_main, smoke_args
from engine_pretrain import build_optimizer
from models_mae import create_model
from target_encoder import build_target


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_staged_teacher_starts_random_and_refreshes_every_k():
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    target = build_target(PretrainConfig(target="staged", k=2, epochs=6, warmup_epochs=0))
    refreshes = []
    for epoch in range(6):
        refreshes.append(target.on_epoch_start(epoch, model.encoder))
        assert target.uses_features(epoch)  # features from epoch 0: the random teacher's
        assert torch.equal(_weights(target.encoder), _weights(model.encoder)) == refreshes[-1]
        with torch.no_grad():  # "training": the student moves away from its teacher
            for p in model.parameters():
                p.add_(0.01)
    assert refreshes == [True, False, True, False, True, False]


def test_stage_reset_restarts_the_student():
    """Over 3 epochs with K=1 each stage's teacher is the previous stage's student, and the student
    restarts: its weights after a refresh are a fresh init (not the teacher's), its AdamW moments empty."""
    from engine_pretrain import Pretraining
    cfg = PretrainConfig(target="staged", k=1, epochs=3, warmup_epochs=0, stage_reset=True, lr=1e-3)
    torch.manual_seed(0)
    model = create_model("mae_vit_smoke_patch4")
    opt = build_optimizer(model, cfg)
    engine = Pretraining(cfg, model, model, opt, build_target(cfg))
    engine.begin_epoch(0, resumed=False)
    model(torch.randn(2, 3, 32, 32), 0.75, ("feature",))[0]["feature"].sum().backward()
    opt.step()
    trained = _weights(model.encoder).clone()
    assert opt.state
    engine.begin_epoch(1, resumed=False)  # new stage: teacher <- trained student, student restarts
    assert engine.refreshed and torch.equal(_weights(engine.target.encoder), trained)
    assert not torch.equal(_weights(model.encoder), trained) and not opt.state
    assert torch.count_nonzero(model.decoder_pred.bias) == 0  # initialize_weights' zero biases


@pytest.mark.slow
def test_staged_pretraining_with_stage_reset_runs(cifar_root, tmp_path):
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "staged", "--k", "1", "--stage_reset"))
    with open(tmp_path / "log.txt") as f:
        log = [json.loads(line) for line in f]
    assert [(r["regress"], r["target_refreshed"]) for r in log] == [("feature", True), ("feature", True)]
