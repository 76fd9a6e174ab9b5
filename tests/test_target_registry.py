"""The target registry: every kind is one class registered by name, the rest of the code reads
the registry, and a new kind (one class plus one registry line) pretrains through main_pretrain."""
import ast
import json
import os

import pytest
import torch

import target_encoder
from config import PretrainConfig
from conftest import ROOT, kind_options, run_main, smoke_args
from models_mae import create_model
from target_encoder import TARGETS, EMATarget, Target, build_target, register_target
from util.errors import UserError

KINDS = ("pixel", "mae_k", "ema", "dual", "random")
# Files that may spell a target kind as a string: the registry itself, and models_mae.py, whose
# decoder head names ("pixel", "feature") are not target kinds.
MAY_NAME_KINDS = {"target_encoder.py", "models_mae.py"}
# Not yet clean (each line says what is left); remove an entry once its file reads the registry.
NOT_KINDS = {"config.py": "--remode 'pixel' is timm's random-erasing fill mode, not a target kind"}


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def negated_ema():
    """A new target kind, added as a forker would: the diff is the 5 lines of the class below."""
    @register_target("ema_negated")
    class NegatedEMATarget(EMATarget):
        """The EMA teacher's features, negated."""
        def feature_target(self, imgs, encoder=None):
            return -super().feature_target(imgs, encoder)
    yield NegatedEMATarget
    del TARGETS["ema_negated"]


def test_registry_holds_every_kind(teacher_file):
    assert set(KINDS) <= set(TARGETS)
    for name, cls in TARGETS.items():
        assert issubclass(cls, Target) and cls.kind == name
        t = build_target(PretrainConfig(target=name, model="mae_vit_smoke_patch4", **kind_options(name, teacher_file)))
        assert type(t) is cls and t.describe(t.switch_epoch or 0)["target"] == name
    with pytest.raises(ValueError, match="already registered"):
        register_target("ema")(EMATarget)
    with pytest.raises(UserError, match="unknown target 'banana'"):
        build_target(PretrainConfig(target="banana"))


def test_frozen_archs_are_the_teachers_each_kind_holds(teacher_file):
    """Target.frozen_archs (what util/memory.py counts before any work) against the encoders a run
    of each kind actually holds once its teachers exist: same number, same widths and depths."""
    from models_mae import arch_of
    for name in TARGETS:
        cfg = PretrainConfig(target=name, model="mae_vit_smoke_patch4", epochs=4, k=1, wse=1,
                             **kind_options(name, teacher_file))
        online = create_model(cfg.model).encoder
        target = build_target(cfg)
        for epoch in range(3):
            target.on_epoch_start(epoch, online)
        held = [(t.embed_dim, len(t.blocks)) for t in target.teachers() if t is not None]
        said = [(a.embed_dim, a.depth) for a in TARGETS[name].frozen_archs(cfg, arch_of(cfg.model))]
        assert held == said, name


@pytest.mark.parametrize("kind,wse,k,epochs,error", [
    ("ema", 0, 10, 1, None), ("ema", 1, 10, 1, r"wse must be in \[0, epochs"),
    ("ema", -1, 10, 5, r"wse must be in \[0, epochs"), ("dual", 5, 2, 5, r"wse must be in \[0, epochs"),
    ("dual", 4, 2, 5, None), ("pixel", 9, 9, 2, None), ("random", 9, 9, 2, None),
    # a teacher that would arrive after the last epoch: the run would be another method
    ("mae_k", 0, 1, 2, None), ("mae_k", 0, 2, 2, "k 2 must be below epochs 2"),
    ("mae_k", 0, 5, 2, "first copies its teacher at the start of epoch 5"),
    ("staged", 0, 2, 2, "second stage of --target staged starts at epoch 2"), ("staged", 0, 1, 2, None),
    ("dual", 0, 5, 5, "k 5 must be below epochs 5")])
def test_kind_specific_config_rules(kind, wse, k, epochs, error):
    cfg = PretrainConfig(target=kind, wse=wse, k=k, epochs=epochs)
    if error is None:
        TARGETS[kind].check_config(cfg)
    else:
        with pytest.raises(UserError, match=error):
            TARGETS[kind].check_config(cfg)


def _kind_literals(path, kinds):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in kinds]


def test_no_other_file_names_a_target_kind():
    """Only target_encoder.py spells a kind; the others read TARGETS (YAML files may name kinds)."""
    kinds = set(KINDS) | set(TARGETS)
    found = {}
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "output", "__pycache__")]
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
            if name.endswith(".py") and rel not in MAY_NAME_KINDS | set(NOT_KINDS):
                hits = _kind_literals(os.path.join(dirpath, name), kinds)
                if hits:
                    found[rel] = hits
    assert not found


@pytest.mark.slow
def test_a_new_kind_pretrains_through_main_pretrain(cifar_root, tmp_path, negated_ema, monkeypatch):
    """One class plus one registry line: --target accepts it, training regresses its target,
    and the log and the checkpoint carry it."""
    calls = []
    real = negated_ema.feature_target
    monkeypatch.setattr(negated_ema, "feature_target",
                        lambda self, imgs, encoder=None: calls.append(len(imgs)) or real(self, imgs, encoder))
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path, "--target", "ema_negated", "--wse", "1"))
    log = read_log(tmp_path)
    assert [r["target"] for r in log] == ["ema_negated"] * 2
    assert [r["regress"] for r in log] == ["pixel", "feature"] and log[1]["target_refreshed"]
    assert calls == [32] * (160 // 32)  # every step of epoch 1 regressed the new target
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["target"] == "ema_negated" and ckpt["target"] is not None
    assert os.path.isfile(tmp_path / "checkpoint-2.pth")


def test_an_unregistered_kind_is_refused(cifar_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "o", "--target", "ema_negated"))
    assert e.value.code == 2 and "ema_negated" in capsys.readouterr().err


@pytest.mark.slow
def test_random_pretrains_from_a_frozen_initial_encoder(cifar_root, tmp_path):
    """--target random: features from epoch 0, the teacher is the online encoder as initialised
    (the seed fixes it) in every checkpoint, and a resumed run ends exactly where the straight one does."""
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "a", "--target", "random", "--epochs", "3"))
    log = read_log(tmp_path / "a")
    assert [r["regress"] for r in log] == ["feature"] * 3
    assert [r["target_refreshed"] for r in log] == [True, False, False]
    ckpts = [torch.load(tmp_path / "a" / f"checkpoint-{n}.pth", weights_only=True) for n in (1, 2, 3)]
    torch.manual_seed(ckpts[0]["config"]["seed"])  # as main_pretrain seeds the model initialisation
    initial = create_model(ckpts[0]["config"]["model"]).encoder.state_dict()
    for n, ckpt in enumerate(ckpts, 1):
        assert all(torch.equal(ckpt["target"][k], v) for k, v in initial.items()), n
        assert any(not torch.equal(ckpt["model"][f"encoder.{k}"], v) for k, v in initial.items())
    run_main("main_pretrain", *smoke_args(cifar_root, tmp_path / "b", "--target", "random", "--epochs", "3",
                                          "--resume", tmp_path / "a" / "checkpoint-1.pth"))
    a = torch.load(tmp_path / "a" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)
    for key in ("model", "target"):
        for name, v in a[key].items():
            assert torch.allclose(v, b[key][name], atol=1e-6), (key, name)
    assert read_log(tmp_path / "b")[-1]["loss"] == pytest.approx(log[-1]["loss"], rel=1e-5)


def test_registry_module_exports():
    """The names the config and the training loop import."""
    assert target_encoder.EMA_EVERY == ("epoch", "step")
    assert target_encoder.TARGET_NORMS == ("none", "layernorm", "instancenorm")
    assert (target_encoder.PIXEL_HEAD, target_encoder.FEATURE_HEAD) == ("pixel", "feature")
