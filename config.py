"""Run configuration: one typed place for defaults, overridden by a YAML file, then by flags.

    defaults (the dataclasses below)  <  --config FILE.yaml  <  command-line flags

Every script's flags are generated from its dataclass, so a flag cannot exist without a
default, a type and a help string, and the flags shared by all scripts are written once
(`RunConfig`). A YAML file may hold top-level keys (must be known to the running script)
and per-script sections `pretrain:`, `finetune:`, `linprobe:` applied after them, so one
file (e.g. configs/smoke.yaml) can serve every script. Unknown keys and wrong types are
errors. The resolved config is saved as OUTPUT_DIR/config.yaml and inside checkpoints.
"""
import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from util.errors import UserError

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "image_folder")
DATA_LOADERS = ("in_memory", "torchvision")


def opt(default: Any, help: str, choices: Optional[Sequence[Any]] = None) -> Any:
    """A config field: default value, help text, optional list of allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    """Flags every script shares: data, optimisation schedule, run bookkeeping."""
    config: str = opt("", "YAML file with defaults; command-line flags override it")
    # data
    dataset: str = opt("cifar10", "dataset name (image_folder: your own images, resized and "
                                  "center-cropped to 32x32 RGB, ImageNet mean/std)", DATASETS)
    data_path: str = opt("./data", "dataset root (CIFAR-10: the folder holding cifar-10-batches-py; "
                                   "CIFAR-100: the folder holding cifar-100-python; "
                                   "Fashion-MNIST: the folder holding the idx files; "
                                   "image_folder: the folder holding train/CLASS/IMAGE and val/CLASS/IMAGE)")
    train_subset: int = opt(0, "use only the first N training images (0: all), for quick studies")
    data_loader: str = opt("in_memory", "in_memory: uint8 set on the device, batched crop/flip; "
                                        "torchvision: per-image PIL transforms in workers", DATA_LOADERS)
    num_workers: int = opt(4, "DataLoader worker processes (torchvision pipeline)")
    # optimisation
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(512, "images per step (per GPU under torchrun)")
    blr: float = opt(1e-3, "base learning rate: lr = blr * global batch / 256")
    lr: Optional[float] = opt(None, "absolute learning rate; overrides blr when set")
    min_lr: float = opt(0.0, "floor of the cosine schedule")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    warmup_epochs: int = opt(5, "linear warm-up epochs before the cosine decay")
    # run
    output_dir: str = opt("", "run directory (default: output/<script>_<variant>)")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    seed: int = opt(0, "random seed")
    resume: str = opt("", "checkpoint to resume from (default: OUTPUT_DIR/checkpoint-last.pth if present)")
    save_freq: int = opt(20, "also keep checkpoint-EPOCH.pth every this many epochs and at the end")
    print_freq: int = opt(20, "steps between progress-bar/TensorBoard updates (each costs one host sync)")
    precision: str = opt("bf16", "bf16 autocast on CUDA (fp32 weights, no GradScaler); fp32 everywhere "
                                 "else (CPU ignores bf16 with a message)", ("bf16", "fp32"))
    compile: bool = opt(False, "torch.compile the model (CUDA only; ignored on CPU with a message)")
    skip_nonfinite: int = opt(0, "skip up to N steps with a NaN/inf loss over the run (0: stop at the "
                                 "first; >0 costs one host sync per step)")

    def validate(self) -> None:
        """Raise UserError with a one-line message for the first invalid value."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.blr > 0, f"blr must be > 0, got {self.blr}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.train_subset >= 0, f"train_subset must be >= 0, got {self.train_subset}"),
            (self.save_freq >= 1, f"save_freq must be >= 1, got {self.save_freq}"),
            (self.print_freq >= 1, f"print_freq must be >= 1, got {self.print_freq}"),
            (self.skip_nonfinite >= 0, f"skip_nonfinite must be >= 0, got {self.skip_nonfinite}"),
            (_valid_device(self.device), f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def resolve(self, world_size: int = 1) -> None:
        """Fill values derived from others, so the saved config holds what actually ran."""
        if self.lr is None:
            self.lr = self.blr * self.batch_size * world_size / 256
        if not self.output_dir:
            self.output_dir = os.path.join("output", self.default_run_name())

    def default_run_name(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda", "mps"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


@dataclass
class PretrainConfig(RunConfig):
    """main_pretrain.py: the report's recipe (REFERENCE.md section 1) by default."""
    model: str = opt("mae_vit_tiny_patch4", "model name in models_mae.MODELS")
    mask_ratio: float = opt(0.75, "fraction of patches removed")
    norm_pix_loss: bool = opt(False, "regress per-patch normalised pixels (MAE's option)")
    target: str = opt("pixel", "reconstruction target (dual: EMA + every-K snapshot)",
                      ("pixel", "mae_k", "ema", "dual"))
    k: int = opt(10, "mae_k: refresh the target encoder every K epochs (pixels before epoch K)")
    tau: float = opt(0.995, "ema: target = tau * target + (1 - tau) * online (0.995 = slow)")
    wse: int = opt(20, "ema: warm-up epochs on pixels before the target encoder is created")
    ema_every: str = opt("epoch", "ema: update after every epoch or every optimizer step", ("epoch", "step"))
    tau_end: Optional[float] = opt(None, "ema: anneal tau to this value on a cosine over training (BYOL/DINO)")
    target_layers: int = opt(1, "target = mean of the top N encoder blocks' outputs (data2vec)")
    target_norm: str = opt("none", "parameter-free normalisation of target tokens",
                           ("none", "layernorm", "instancenorm"))
    target_prenorm: bool = opt(False, "take blocks before the final LayerNorm (BootMAE)")
    pixel_weight: float = opt(0.0, "after the switch, keep the pixel loss with this weight (BootMAE)")
    feature_ramp: int = opt(0, "after the switch, ramp the feature loss weight to 1 over this many epochs")
    slow_lambda: float = opt(0.2, "dual: weight of the every-K snapshot loss")
    epochs: int = opt(200, "pretraining epochs")
    warmup_epochs: int = opt(40, "linear warm-up epochs before the cosine decay")
    knn_every: int = opt(0, "run the kNN monitor every N epochs and at the end (0: never)")
    knn_pool: str = opt("cls", "kNN monitor features: cls token or mean of patch tokens", ("cls", "avg"))
    knn_k: int = opt(20, "kNN: neighbours")
    knn_t: float = opt(0.07, "kNN: temperature of the similarity weights")

    def validate(self) -> None:
        super().validate()
        from models_mae import MODELS  # local: keep config importable without torch models
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}; choose from {', '.join(sorted(MODELS))}"),
            (0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
            (self.k >= 1, f"k must be >= 1, got {self.k}"),
            (0 <= self.tau < 1, f"tau must be in [0, 1), got {self.tau}"),
            (self.wse >= 0, f"wse must be >= 0, got {self.wse}"),
            (self.knn_every >= 0, f"knn_every must be >= 0, got {self.knn_every}"),
            (self.target not in ("ema", "dual") or 0 <= self.wse < self.epochs,
             f"wse must be in [0, epochs={self.epochs}), got {self.wse}"),
            (self.tau_end is None or 0 <= self.tau_end < 1, f"tau_end must be in [0, 1), got {self.tau_end}"),
            (1 <= self.target_layers <= 64, f"target_layers must be >= 1, got {self.target_layers}"),
            (self.pixel_weight >= 0, f"pixel_weight must be >= 0, got {self.pixel_weight}"),
            (self.feature_ramp >= 0, f"feature_ramp must be >= 0, got {self.feature_ramp}"),
            (self.slow_lambda >= 0, f"slow_lambda must be >= 0, got {self.slow_lambda}"),
            (self.knn_k >= 1, f"knn_k must be >= 1, got {self.knn_k}"),
            (self.knn_t > 0, f"knn_t must be > 0, got {self.knn_t}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def default_run_name(self) -> str:
        return f"pretrain_{self.target}"


@dataclass
class EvalConfig(RunConfig):
    """Shared by fine-tuning and linear probing: which encoder to start from."""
    model: str = opt("", "classifier in models_vit.MODELS (default: the pretraining checkpoint's "
                         "encoder, else vit_tiny_patch4)")
    finetune: str = opt("", "pretraining checkpoint whose encoder initialises the classifier "
                            "(default: the newest output/*/checkpoint-last.pth of a pretraining run)")
    checkpoint_key: str = opt("model", "encoder to take from it: online (model) or target", ("model", "target"))
    from_scratch: bool = opt(False, "random initialisation, no pretraining (the report's baseline)")

    def validate(self) -> None:
        super().validate()
        from models_vit import MODELS
        if self.model and self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(sorted(MODELS))}")
        if self.from_scratch and self.finetune:
            raise UserError("--from_scratch and --finetune exclude each other")


@dataclass
class FinetuneConfig(EvalConfig):
    """main_finetune.py: the report's fine-tuning recipe (REFERENCE.md section 1)."""
    data_loader: str = opt("torchvision", "fine-tuning needs per-image RandAugment and random erasing: "
                                          "the torchvision pipeline in worker processes", ("torchvision",))
    epochs: int = opt(100, "fine-tuning epochs")
    blr: float = opt(1e-3, "base learning rate: lr = blr * global batch / 256")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    warmup_epochs: int = opt(5, "linear warm-up epochs before the cosine decay")
    layer_decay: float = opt(0.75, "layer-wise lr decay: block i gets lr * layer_decay^(depth + 1 - i)")
    drop_path: float = opt(0.1, "stochastic depth rate")
    global_pool: bool = opt(True, "classify the mean of patch tokens (MAE's default) instead of the cls token")
    smoothing: float = opt(0.1, "label smoothing")
    aa: str = opt("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('' for none)")
    reprob: float = opt(0.25, "random erasing probability")
    remode: str = opt("pixel", "random erasing fill mode", ("pixel", "rand", "const"))
    mixup: float = opt(0.0, "mixup alpha (0: off)")
    cutmix: float = opt(0.0, "cutmix alpha (0: off)")
    mixup_prob: float = opt(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = opt(0.5, "probability of cutmix instead of mixup when both are on")
    clip_grad: Optional[float] = opt(None, "clip the gradient norm to this value")

    def validate(self) -> None:
        super().validate()
        checks = [
            (0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}"),
            (0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}"),
            (0 <= self.reprob <= 1, f"reprob must be in [0, 1], got {self.reprob}"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
            (0 <= self.mixup_prob <= 1, f"mixup_prob must be in [0, 1], got {self.mixup_prob}"),
            (self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be > 0, got {self.clip_grad}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def default_run_name(self) -> str:
        return "finetune"


@dataclass
class LinprobeConfig(EvalConfig):
    """main_linprobe.py: frozen encoder, BatchNorm + linear head, LARS (REFERENCE.md section 1)."""
    epochs: int = opt(100, "probe epochs")
    blr: float = opt(0.1, "base learning rate: lr = blr * global batch / 256")
    weight_decay: float = opt(0.0, "LARS weight decay")
    warmup_epochs: int = opt(10, "linear warm-up epochs before the cosine decay")
    pool: str = opt("cls", "probe features: cls token or mean of patch tokens", ("cls", "avg"))
    aug: bool = opt(True, "RandomResizedCrop + flip on training images (ignored with --cached_features)")
    cached_features: bool = opt(False, "fast path: extract features once, without augmentation, "
                                       "and train the head on them")
    knn: bool = opt(False, "also report weighted kNN accuracy of the frozen features")
    knn_k: int = opt(20, "kNN: neighbours")
    knn_t: float = opt(0.07, "kNN: temperature of the similarity weights")

    def validate(self) -> None:
        super().validate()
        if self.knn_k < 1 or self.knn_t <= 0:
            raise UserError(f"knn_k must be >= 1 and knn_t > 0, got {self.knn_k}, {self.knn_t}")

    def default_run_name(self) -> str:
        return "linprobe"


SECTIONS: Dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig,
                             "linprobe": LinprobeConfig}


# ---- parsing ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _check_type(key: str, value: Any, tp: Any, where: str) -> Any:
    base = _base_type(tp)
    if value is None and base is not tp:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise UserError(f"{where}: {key} must be true or false, got {value!r}")
    if base in (int, float, str) and (not isinstance(value, base) or isinstance(value, bool) and base is not bool):
        raise UserError(f"{where}: {key} must be {base.__name__}, got {value!r}")
    return value


def load_yaml(path: str, cls: type, section: str) -> Dict[str, Any]:
    """Read a config file into {key: value} for `cls`, checking keys and types."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    out: Dict[str, Any] = {}
    for name, sub_cls in SECTIONS.items():  # other scripts' sections: check the keys, then skip
        sub = raw.get(name, {})
        if not isinstance(sub, dict):
            raise UserError(f"{path}: section {name!r} must be a mapping")
        bad = sorted(set(sub) - set(typing.get_type_hints(sub_cls)))
        if bad:
            raise UserError(f"{path}: unknown key(s) in section {name!r}: {', '.join(bad)}")
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    for where, block in ((path, top), (f"{path} [{section}]", raw.get(section, {}))):
        for key, value in block.items():
            if key not in hints or key == "config":
                raise UserError(f"{where}: unknown key {key!r} for {section}")
            out[key] = _check_type(key, value, hints[key], where)
    return out


def build_parser(cls: type, defaults: Dict[str, Any], prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, meta = _base_type(hints[f.name]), f.metadata
        kwargs: Dict[str, Any] = {"default": defaults[f.name], "help": meta.get("help", "")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(cls: type, section: str, argv: Optional[List[str]] = None):
    """defaults < YAML < flags; validated. Raises UserError on bad input."""
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    defaults = cls().to_dict()
    if known.config:
        defaults.update(load_yaml(known.config, cls, section))
    args = build_parser(cls, defaults).parse_args(argv)
    cfg = cls(**vars(args))
    cfg.validate()
    return cfg


def save_yaml(cfg_dict: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg_dict, f, sort_keys=False)
