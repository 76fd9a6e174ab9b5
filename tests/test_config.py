"""config.py: field metadata (choices, bounds, finite) checked from one place, for values from
defaults, YAML and flags alike; value lists owned by their modules and read live."""
import dataclasses
import os
import typing

import pytest
import torch
import yaml

import config
from conftest import ROOT
from config import (SECTIONS, FinetuneConfig, LinprobeConfig, PretrainConfig, RunConfig, bounds_text,
                    build_parser, check_field, choices_of, parse_config)
from util.errors import UserError

CLASSES = list(SECTIONS.items())

# (config class, field, module, list): every choice list is the owning module's own object.
OWNED = [
    (RunConfig, "dataset", "dataio.datasets", "DATASETS"),
    (RunConfig, "data_loader", "dataio.loader", "DATA_LOADERS"),
    (RunConfig, "precision", "util.runtime", "PRECISIONS"),
    (PretrainConfig, "model", "models_mae", "MODELS"),
    (PretrainConfig, "target", "target_encoder", "TARGETS"),
    (PretrainConfig, "ema_every", "target_encoder", "EMA_EVERY"),
    (PretrainConfig, "target_norm", "target_encoder", "TARGET_NORMS"),
    (PretrainConfig, "knn_pool", "models_vit", "POOLS"),
    (LinprobeConfig, "pool", "models_vit", "POOLS"),
    (FinetuneConfig, "model", "models_vit", "MODELS"),
    (FinetuneConfig, "checkpoint_key", "models_vit", "CHECKPOINT_KEYS"),
]


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _fields_of_type(tp):
    for section, cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if tp in (hints[f.name], typing.Optional[tp]):
                yield section, cls, f


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("section,cls", CLASSES)
def test_defaults_are_valid(section, cls):
    cls().validate()
    assert parse_config(cls, section, []).to_dict() == cls().to_dict()


@pytest.mark.parametrize("cls,name,module,attr", OWNED)
def test_choice_lists_belong_to_their_module(cls, name, module, attr):
    import importlib
    owned = getattr(importlib.import_module(module), attr)
    f = _field(cls, name)
    assert f.metadata["choices"] == f"{module}.{attr}"  # a reference, not a copy
    assert choices_of(f) == tuple(owned)


def test_config_reads_the_dataset_list_from_dataio():
    """One source of truth: --dataset's choices are dataio.datasets.DATASETS, not a copy."""
    import dataio.datasets
    field = next(f for f in dataclasses.fields(config.RunConfig) if f.name == "dataset")
    assert config.choices_of(field) == tuple(dataio.datasets.DATASETS)
    assert not hasattr(config, "DATASETS") and "DATA_LOADERS" not in vars(config)


def test_a_target_registered_at_runtime_is_a_choice(tmp_path, monkeypatch):
    import target_encoder
    monkeypatch.setitem(target_encoder.TARGETS, "my_target", target_encoder.TARGETS["pixel"])
    assert parse_config(PretrainConfig, "pretrain", ["--target", "my_target"]).target == "my_target"
    path = _yaml(tmp_path, "pretrain:\n  target: my_target\n")
    assert parse_config(PretrainConfig, "pretrain", ["--config", path]).target == "my_target"
    assert "my_target" in build_parser(PretrainConfig, PretrainConfig().to_dict()).format_help()


def test_the_target_kind_checks_its_own_rules(monkeypatch):
    import target_encoder
    seen = []

    class Mine(target_encoder.TARGETS["pixel"]):
        @classmethod
        def check_config(cls, cfg):
            seen.append(cfg.target)
            raise UserError("mine needs something")
    monkeypatch.setitem(target_encoder.TARGETS, "mine", Mine)
    with pytest.raises(UserError, match="mine needs something"):
        parse_config(PretrainConfig, "pretrain", ["--target", "mine"])
    assert seen == ["mine"]


YAML_SPELLING = {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}


@pytest.mark.parametrize("section,cls,f", list(_fields_of_type(float)), ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_every_float_field_must_be_finite(tmp_path, section, cls, f, bad):
    with pytest.raises(UserError, match=f"^{f.name} must be a finite number, got {bad}$"):
        parse_config(cls, section, [f"--{f.name}={bad}"])
    path = _yaml(tmp_path, f"{section}:\n  {f.name}: {YAML_SPELLING[bad]}\n")
    with pytest.raises(UserError, match=f"c.yaml \\[{section}\\]: {f.name} must be a finite number"):
        parse_config(cls, section, ["--config", path])


def _outside(meta):
    """A value just outside each bound of a field, with the bound itself when it is allowed."""
    for key, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if meta.get(key) is not None:
            yield meta[key] + step


@pytest.mark.parametrize("section,cls", CLASSES)
def test_bounds_hold_for_yaml_values(tmp_path, section, cls):
    hints = typing.get_type_hints(cls)
    checked = 0
    for f in dataclasses.fields(cls):
        for value in _outside(f.metadata):
            value = float(value) if hints[f.name] in (float, typing.Optional[float]) else value
            path = _yaml(tmp_path, yaml.safe_dump({section: {f.name: value}}))
            with pytest.raises(UserError) as e:
                parse_config(cls, section, ["--config", path])
            assert str(e.value) == f"{path} [{section}]: {f.name} must be {bounds_text(f.metadata)}, got {value}"
            checked += 1
    assert checked >= 15


def test_bounds_text():
    assert bounds_text({"ge": 1}) == ">= 1"
    assert bounds_text({"gt": 0}) == "> 0"
    assert bounds_text({"ge": 0, "lt": 1}) == "in [0, 1)"
    assert bounds_text({"gt": 0, "le": 1}) == "in (0, 1]"
    assert bounds_text({}) == ""


@pytest.mark.parametrize("section,cls", CLASSES[1:])
def test_overridden_fields_keep_the_base_rules(section, cls):
    base = {f.name: f for f in dataclasses.fields(RunConfig)}
    for f in dataclasses.fields(cls):
        # on purpose: fine-tuning narrows the loaders; evaluation's input_size 0 = the pretraining run's
        if f.name in base and f.name not in ("data_loader", "input_size"):
            for key in ("ge", "gt", "le", "lt", "choices"):
                assert f.metadata.get(key) == base[f.name].metadata.get(key), (cls.__name__, f.name, key)


def test_flags_override_yaml_and_messages_name_the_source(tmp_path):
    path = _yaml(tmp_path, "epochs: 0\nwarmup_epochs: 0\npretrain:\n  k: 0\n")
    cfg = parse_config(PretrainConfig, "pretrain", ["--config", path, "--epochs", "3", "--k", "2"])
    assert (cfg.epochs, cfg.k) == (3, 2)
    with pytest.raises(UserError, match=r"c.yaml: epochs must be >= 1, got 0$"):
        parse_config(PretrainConfig, "pretrain", ["--config", path, "--k", "2"])
    with pytest.raises(UserError, match=r"c.yaml \[pretrain\]: k must be >= 1, got 0$"):
        parse_config(PretrainConfig, "pretrain", ["--config", path, "--epochs", "3"])
    with pytest.raises(UserError, match=r"^k must be >= 1, got -1$"):  # a flag: no file named
        parse_config(PretrainConfig, "pretrain", ["--config", path, "--epochs", "3", "--k", "-1"])


def test_help_shows_live_choices_and_yaml_defaults(tmp_path):
    path = _yaml(tmp_path, "pretrain:\n  mask_ratio: 0.5\n  norm_pix_loss: true\n")
    text = build_parser(PretrainConfig, {**PretrainConfig().to_dict(), "mask_ratio": 0.5,
                                         "norm_pix_loss": True}).format_help()
    assert "{in_memory,torchvision}" in text and "(default: 0.5)" in text and "(default: True)" in text
    assert parse_config(PretrainConfig, "pretrain", ["--config", path]).norm_pix_loss is True


def test_blank_model_means_unset_but_unknown_is_refused():
    assert parse_config(FinetuneConfig, "finetune", []).model == ""
    with pytest.raises(UserError, match="unknown model 'vit_huge'; choose from"):
        parse_config(FinetuneConfig, "finetune", ["--model", "vit_huge"])


def test_every_str_field_must_be_utf8():
    bad = os.fsdecode(b"x\xff")
    for section, cls in CLASSES:
        for f in dataclasses.fields(cls):
            if isinstance(getattr(cls(), f.name), str):
                with pytest.raises(UserError, match="not UTF-8"):
                    check_field(f, bad)


def test_duplicate_keys_refused_merge_keys_allowed(tmp_path):
    with pytest.raises(UserError, match=r"duplicate key 'epochs' \(line 3\)"):
        parse_config(PretrainConfig, "pretrain", ["--config", _yaml(tmp_path, "epochs: 1\nseed: 2\nepochs: 3\n")])
    text = "pretrain: &p\n  k: 2\nlinprobe:\n  <<: {blr: 0.5}\n  blr: 0.2\n"
    cfg = parse_config(LinprobeConfig, "linprobe", ["--config", _yaml(tmp_path, text)])
    assert cfg.blr == 0.2


def test_yaml_number_without_dot_gets_a_hint(tmp_path):
    with pytest.raises(UserError, match=r"blr must be float, got '1e-3' \(YAML reads"):
        parse_config(PretrainConfig, "pretrain", ["--config", _yaml(tmp_path, "blr: 1e-3\n")])


def test_largest_seed_fits_every_derived_seed():
    from util.runtime import DATA, epoch_seed
    s = epoch_seed(config.SEED_MAX, 10**6, 4095, DATA)
    torch.manual_seed(s)
    torch.Generator().manual_seed(s)
    parse_config(PretrainConfig, "pretrain", ["--seed", str(config.SEED_MAX)])
    with pytest.raises(UserError, match=r"seed must be in \[0, 4294967295\]"):
        parse_config(PretrainConfig, "pretrain", ["--seed", str(config.SEED_MAX + 1)])


def test_mask_ratio_limits_follow_the_patch_count():
    from models_mae import num_patches, random_masking
    assert num_patches("mae_vit_tiny_patch4") == num_patches("mae_vit_smoke_patch4", 32) == 64
    for ratio in (1 / 64, 1 - 1 / 64, 1e-10):
        parse_config(PretrainConfig, "pretrain", ["--mask_ratio", str(ratio)])
        kept = random_masking(torch.zeros(1, 64, 2), ratio)[0].shape[1]
        assert 0 < kept < 64
    for ratio, message in ((0.99, "keeps none of the 64 patches"), (1e-17, "removes none of the 64 patches")):
        with pytest.raises(UserError, match=message):
            parse_config(PretrainConfig, "pretrain", ["--mask_ratio", str(ratio)])


def test_finetune_augmentation_is_built_by_timm_at_validation():
    parse_config(FinetuneConfig, "finetune", ["--aa", ""])
    parse_config(FinetuneConfig, "finetune", ["--aa", "rand-n3-m10-inc1", "--remode", "const"])
    with pytest.raises(UserError, match="aa 'rand-w0' is not a RandAugment policy timm accepts"):
        parse_config(FinetuneConfig, "finetune", ["--aa", "rand-w0"])


def test_device_names():
    for good in ("cpu", "auto"):
        parse_config(PretrainConfig, "pretrain", ["--device", good])
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:\u00b2", "CPU"):
        with pytest.raises(UserError, match="device must be auto, cpu, cuda, cuda:N or mps"):
            parse_config(PretrainConfig, "pretrain", ["--device", bad])


@pytest.mark.parametrize("preset", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")))
def test_every_top_level_preset_parses(preset):
    """Each configs/*.yaml section parses through the same checks as the command line, so a
    preset that names an unknown key or an out-of-range value fails here, not in a user's run."""
    path = os.path.join(ROOT, "configs", preset)
    with open(path) as f:
        sections = [s for s in yaml.safe_load(f) if s in SECTIONS]
    assert sections, f"{preset} has no pretrain/finetune/linprobe section"
    for stage in sections:
        cfg = parse_config(SECTIONS[stage], stage, ["--config", path])
        assert isinstance(cfg, SECTIONS[stage])


@pytest.mark.parametrize("cls", list(SECTIONS.values()))
def test_help_is_grouped_and_every_flag_is_in_one_group(cls, capsys):
    """--help reads as a table of contents: every field in exactly one group, the options of a
    target kind in a group named after the kinds that read them."""
    from config import help_groups
    groups = help_groups(cls)
    placed = [name for _, names in groups for name in names]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(cls))  # each once, none left over
    with pytest.raises(SystemExit):
        build_parser(cls, cls().to_dict()).parse_args(["--help"])
    out = capsys.readouterr().out
    assert "data:" in out and "run, speed and faults:" in out
    if cls is SECTIONS["pretrain"]:
        assert set(dict(groups)["--target ema / dual"]) == {"tau", "wse", "ema_every", "tau_end"}
        assert "--target teacher:" in out
