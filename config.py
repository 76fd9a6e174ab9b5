"""Run configuration: one typed place for defaults, overridden by a YAML file, then by flags.

    defaults (the dataclasses below)  <  --config FILE.yaml  <  command-line flags

Every script's flags are generated from its dataclass, so a flag cannot exist without a
default, a type and a help string, and the flags shared by all scripts are written once
(`RunConfig`). A YAML file may hold top-level keys (must be known to the running script)
and per-script sections `pretrain:`, `finetune:`, `linprobe:` applied after them, so one
file (e.g. configs/smoke.yaml) can serve every script. Unknown keys, duplicate keys and
wrong types are errors.

What a field accepts is written once, in its metadata (`opt`): choices, bounds, and for
every float "finite". After the merge, `validate` checks every field against it, whatever
the value came from, then the class's rules beyond one field (`check_rules`: warm-up within
the epochs, the device exists here, the mask ratio keeps and removes a patch, the target
kind's own `check_config`, timm accepts the fine-tuning augmentation), all before any work.
Value lists are the owning module's own, read live (a target kind registered at runtime is
a choice).
The resolved config is saved as OUTPUT_DIR/config.yaml and inside checkpoints.
"""
import argparse
import dataclasses
import importlib
import math
import operator
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import yaml

from target_encoder import PixelTarget
from util.errors import ArgumentParser, UserError

# The largest --seed: every seed derived from it (util.runtime.epoch_seed, for any realistic
# epoch and rank) still fits the 64 bits torch.manual_seed takes.
SEED_MAX = 2**32 - 1


def opt(default: Any, help: str, choices: Union[None, str, Sequence[Any]] = None, *,
        ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
        lt: Optional[float] = None, blank: bool = False, cli_choices: bool = True) -> Any:
    """A config field: default value, help text, and what it accepts.

    choices: the allowed values, or "module.NAME": the owning module's list or registry,
        read at every check (so kinds added at runtime are accepted).
    ge, gt, le, lt: bounds (>=, >, <=, <); float fields must also be finite (always checked).
    blank: "" is accepted besides the choices (meaning "unset": derived later).
    cli_choices: also hand the choices to argparse (shown in --help, refused as it parses).
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "blank": blank, "cli_choices": cli_choices}
    return field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> Optional[Tuple[Any, ...]]:
    """A field's allowed values now (None: any); "module.NAME" is looked up at each call."""
    spec = f.metadata.get("choices")
    if isinstance(spec, str):
        module, name = spec.rsplit(".", 1)
        spec = getattr(importlib.import_module(module), name)
    return None if spec is None else tuple(spec)


@dataclass
class RunConfig:
    """Flags every script shares: data, optimisation schedule, run bookkeeping."""
    # The keys the command set (YAML or flags), by parse_config; the rest are defaults. Not a
    # field: a resumed run takes the checkpoint's value for every key not given (util.rundir).
    given: ClassVar[FrozenSet[str]] = frozenset()
    config: str = opt("", "YAML file with defaults; command-line flags override it")
    # data
    dataset: str = opt("cifar10", "dataset name (image_folder: your own images, RGB, ImageNet mean/std; read "
                                  "per step at their own size with --data_loader torchvision)",
                       "dataio.datasets.DATASETS")
    data_path: str = opt("./data", "dataset root (CIFAR-10: the folder holding cifar-10-batches-py; "
                                   "CIFAR-100: the folder holding cifar-100-python; "
                                   "Fashion-MNIST: the folder holding the idx files; "
                                   "image_folder: the folder holding train/CLASS/IMAGE and val/CLASS/IMAGE)")
    train_subset: int = opt(0, "use only the first N training images (0: all), for quick studies", ge=0)
    data_loader: str = opt("in_memory", "in_memory: uint8 set on the device, batched crop/flip (image_folder: "
                                        "each image's central square at input_size, refused if it would not "
                                        "fit); torchvision: per-image PIL transforms in workers",
                           "dataio.loader.DATA_LOADERS")
    num_workers: int = opt(4, "DataLoader worker processes (torchvision pipeline)", ge=0)
    input_size: int = opt(32, "image side the model sees, a multiple of its patch (CIFAR/Fashion-MNIST: 32, "
                              "their native size, or larger: enlarged on the fly; image_folder: any, e.g. 224)",
                          ge=1)
    norm_mean: str = opt("", "per-channel input mean, comma-separated, 0-1 scale (empty: the dataset's; "
                             "fine-tuning/probing: the pretraining run's)")
    norm_std: str = opt("", "per-channel input std, comma-separated (empty: the dataset's; fine-tuning/"
                            "probing: the pretraining run's). CIFAR-10's default is the report's "
                            "0.2023,0.1994,0.2010; the data's true std is 0.2470,0.2435,0.2616")
    # optimisation
    epochs: int = opt(100, "training epochs", ge=1)
    batch_size: int = opt(512, "images per step (per GPU under torchrun)", ge=1)
    accum_iter: int = opt(1, "accumulate gradients over this many steps per optimizer step "
                             "(effective batch = batch_size x accum_iter x GPUs)", ge=1)
    blr: float = opt(1e-3, "base learning rate: lr = blr * global batch / 256", gt=0)
    lr: Optional[float] = opt(None, "absolute learning rate; overrides blr when set", gt=0)
    min_lr: float = opt(0.0, "floor of the cosine schedule", ge=0)
    weight_decay: float = opt(0.05, "AdamW weight decay", ge=0)
    warmup_epochs: int = opt(5, "linear warm-up epochs before the cosine decay", ge=0)
    # run
    output_dir: str = opt("", "run directory (default: output/<script>_<variant>)")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda, cuda:N or mps")
    seed: int = opt(0, "random seed", ge=0, le=SEED_MAX)
    resume: str = opt("", "checkpoint to resume from (default: OUTPUT_DIR/checkpoint-last.pth if present)")
    save_freq: int = opt(20, "also keep checkpoint-EPOCH.pth every this many epochs and at the end", ge=1)
    print_freq: int = opt(20, "steps between progress-bar/TensorBoard updates (each costs one host sync)", ge=1)
    precision: str = opt("auto", "auto: bf16 autocast where the device runs bf16 natively (CUDA with bf16, a CPU "
                                 "with AVX512-BF16/AMX), else fp32; bf16 or fp32 to force one. Weights and "
                                 "optimizer state stay fp32, no GradScaler; config.yaml records the choice",
                         choices="util.runtime.PRECISIONS")
    compile: bool = opt(False, "torch.compile the model and the target encoder (CUDA and CPU; CPU needs a "
                               "C++ compiler)")
    skip_nonfinite: int = opt(0, "skip up to N steps with a NaN/inf loss over the run (0: stop at the "
                                 "first; >0 costs one host sync per step)", ge=0)

    def validate(self, sources: Optional[Dict[str, str]] = None) -> None:
        """Raise UserError with a one-line message for the first invalid value: every field
        against its metadata, then the class's cross-field rules.

        sources: where each value came from, as a message prefix ("FILE: "; flags and
        defaults: none), from `parse_config`.
        """
        check_fields(self, sources or {})
        self.check_rules()

    def check_rules(self) -> None:
        """Rules between fields, and the device: subclasses add theirs (call super first)."""
        if self.warmup_epochs > self.epochs:
            raise UserError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        check_device(self.device)
        from dataio.datasets import normalization
        normalization(self)  # raises on a malformed --norm_mean / --norm_std

    def resolve(self, world_size: int = 1) -> None:
        """Fill values derived from others, so the saved config holds what actually ran."""
        if self.lr is None:
            self.lr = self.blr * self.batch_size * self.accum_iter * world_size / 256  # the effective batch
        if not self.output_dir:
            self.output_dir = os.path.join("output", self.default_run_name())
        from dataio.datasets import normalization, stats_text
        # the values themselves, not "the dataset's": a default that changes cannot change what a run recorded
        self.norm_mean, self.norm_std = (stats_text(v) for v in normalization(self))

    def default_run_name(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_device(device: str) -> None:
    """The device is spelled right and exists here: one line now rather than a traceback later."""
    import torch  # local: keep config importable without torch
    kind, _, index = device.partition(":")
    if device not in ("auto", "cpu", "cuda", "mps") and not (
            kind == "cuda" and index.isascii() and index.isdigit()):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps requested but MPS is not available in this PyTorch build or on this "
                        "machine (use --device cpu or auto)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available (use --device cpu or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


@dataclass
class PretrainConfig(RunConfig):
    """main_pretrain.py: the report's recipe (REFERENCE.md section 1) by default."""
    # registry names: refused by the validator ("unknown model ...; choose from"), not argparse
    model: str = opt("mae_vit_tiny_patch4", "model name in models_mae.MODELS", "models_mae.MODELS",
                     cli_choices=False)
    mask_ratio: float = opt(0.75, "fraction of patches removed", gt=0, lt=1)
    norm_pix_loss: bool = opt(False, "regress per-patch normalised pixels (MAE's option)")
    target: str = opt(PixelTarget.kind, "reconstruction target, a kind in target_encoder.TARGETS",
                      "target_encoder.TARGETS")
    k: int = opt(10, "mae_k: refresh the target encoder every K epochs (pixels before epoch K); dual: its "
                     "snapshot's period; staged: each stage's length", ge=1)
    tau: float = opt(0.995, "ema: target = tau * target + (1 - tau) * online (0.995 = slow)", ge=0, lt=1)
    wse: int = opt(20, "ema: warm-up epochs on pixels before the target encoder is created", ge=0)
    ema_every: str = opt("epoch", "ema: update after every epoch or every optimizer step",
                         "target_encoder.EMA_EVERY")
    tau_end: Optional[float] = opt(None, "ema: anneal tau to this value on a cosine over training (BYOL/DINO)",
                                   ge=0, lt=1)
    target_layers: int = opt(1, "target = mean of the top N encoder blocks' outputs (data2vec)", ge=1)
    target_norm: str = opt("none", "parameter-free normalisation of target tokens",
                           "target_encoder.TARGET_NORMS")
    target_prenorm: bool = opt(False, "take blocks before the final LayerNorm (BootMAE)")
    pixel_weight: float = opt(0.0, "after the switch, keep the pixel loss with this weight (BootMAE)", ge=0)
    feature_ramp: int = opt(0, "after the switch, ramp the feature loss weight to 1 over this many epochs",
                            ge=0)
    slow_lambda: float = opt(0.2, "dual: weight of the every-K snapshot loss", ge=0)
    num_masks: int = opt(1, "masked views per image per step, sharing ONE target pass (data2vec 2.0's "
                            "multi-mask); the batch's compute grows M times on the online side only", ge=1)
    feature_decoder: str = opt("shared", "the feature head on the pixel head's decoder (shared) or on a decoder "
                                         "of its own, same shape (separate; BootMAE)", "models_mae.FEATURE_DECODERS")
    teacher: str = opt("", "--target teacher: an encoder.safetensors written by export_weights.py (any width, any "
                           "input size on this model's patch grid) whose features are regressed from epoch 0")
    stage_reset: bool = opt(False, "re-initialise the student (weights and optimizer moments) whenever the "
                                   "target encoder is refreshed (dBOT's staged teachers: --target staged)")
    # Recipe details where the report's code, official MAE and an independent loop differ (issues 17
    # and 27, docs/RESULTS.md section 4): each is an option; the default is the report's choice where
    # its code makes one (the feature head's init; CIFAR-10's std, dataio.datasets), else official MAE's.
    wd_norm_bias: bool = opt(False, "weight-decay every parameter (LayerNorm gains, biases, cls and mask "
                                    "tokens); default: matrices only, as official MAE")
    crop_interpolation: str = opt("bicubic", "resampling of the pretraining crop (bilinear_uint8: bilinear, "
                                             "rounded back to uint8 like resampling the uint8 image)",
                                  "dataio.augment.INTERPOLATIONS")
    feature_head_init: str = opt("torch", "init of the feature head: torch (nn.Linear's default: the report's "
                                          "code creates a fresh Linear at the switch) or xavier (as every other "
                                          "Linear, official MAE)", "models_mae.HEAD_INITS")
    epochs: int = opt(200, "pretraining epochs", ge=1)
    warmup_epochs: int = opt(40, "linear warm-up epochs before the cosine decay", ge=0)
    knn_every: int = opt(0, "run the kNN monitor every N epochs and at the end (0: never)", ge=0)
    knn_pool: str = opt("cls", "kNN monitor features: cls token or mean of patch tokens", "models_vit.POOLS")
    knn_k: int = opt(20, "kNN: neighbours", ge=1)
    knn_t: float = opt(0.07, "kNN: temperature of the similarity weights", gt=0)

    def check_rules(self) -> None:
        super().check_rules()
        self.check_mask_ratio()
        check_target(self)

    def check_mask_ratio(self) -> None:
        """At least one patch kept and one removed, counted as models_mae.random_masking does."""
        from models_mae import num_patches
        size = self.input_size
        total = num_patches(self.model, size)
        keep = int(total * (1 - self.mask_ratio))
        shape = f"of the {total} patches of {self.model} on {size}x{size} images"
        if keep == 0:
            raise UserError(f"mask_ratio {self.mask_ratio} keeps none {shape}; at most {1 - 1 / total:.6g} "
                            f"keeps one")
        if keep == total:
            raise UserError(f"mask_ratio {self.mask_ratio} removes none {shape}; {1 / total:.6g} or more "
                            f"removes one")

    def default_run_name(self) -> str:
        return f"pretrain_{self.target}"


def check_target(cfg: "PretrainConfig") -> None:
    """The target kind's own rules (e.g. ema: 0 <= wse < epochs), written by its class."""
    from target_encoder import TARGETS
    TARGETS[cfg.target].check_config(cfg)


@dataclass
class EvalConfig(RunConfig):
    """Shared by fine-tuning and linear probing: which encoder to start from."""
    model: str = opt("", "classifier in models_vit.MODELS (default: the pretraining checkpoint's "
                         "encoder, else vit_tiny_patch4)", "models_vit.MODELS", blank=True, cli_choices=False)
    finetune: str = opt("", "pretraining checkpoint whose encoder initialises the classifier "
                            "(default: the newest output/*/checkpoint-last.pth of a pretraining run)")
    checkpoint_key: str = opt("model", "encoder to take from it: online (model) or target",
                              "models_vit.CHECKPOINT_KEYS")
    from_scratch: bool = opt(False, "random initialisation, no pretraining (the report's baseline)")
    input_size: int = opt(0, "image side the model sees (0: the pretraining run's, 32 from scratch; another "
                             "size interpolates the position embeddings)", ge=0)

    def check_rules(self) -> None:
        super().check_rules()
        if self.from_scratch and self.finetune:
            raise UserError("--from_scratch and --finetune exclude each other")


@dataclass
class FinetuneConfig(EvalConfig):
    """main_finetune.py: the report's fine-tuning recipe (REFERENCE.md section 1)."""
    # one of dataio.loader.DATA_LOADERS: the only one with per-image RandAugment and erasing
    data_loader: str = opt("torchvision", "fine-tuning needs per-image RandAugment and random erasing: "
                                          "the torchvision pipeline in worker processes", ("torchvision",))
    epochs: int = opt(100, "fine-tuning epochs", ge=1)
    blr: float = opt(1e-3, "base learning rate: lr = blr * global batch / 256", gt=0)
    weight_decay: float = opt(0.05, "AdamW weight decay", ge=0)
    warmup_epochs: int = opt(5, "linear warm-up epochs before the cosine decay", ge=0)
    layer_decay: float = opt(0.75, "layer-wise lr decay: block i gets lr * layer_decay^(depth + 1 - i)",
                             gt=0, le=1)
    drop_path: float = opt(0.1, "stochastic depth rate", ge=0, lt=1)
    global_pool: bool = opt(True, "classify the mean of patch tokens (MAE's default) instead of the cls token")
    smoothing: float = opt(0.1, "label smoothing", ge=0, lt=1)
    aa: str = opt("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('' for none)")
    reprob: float = opt(0.25, "random erasing probability", ge=0, le=1)
    remode: str = opt("pixel", "random erasing fill mode (timm's RandomErasing modes)", ("pixel", "rand", "const"))
    mixup: float = opt(0.0, "mixup alpha (0: off)", ge=0)
    cutmix: float = opt(0.0, "cutmix alpha (0: off)", ge=0)
    mixup_prob: float = opt(1.0, "probability of applying mixup or cutmix to a batch", ge=0, le=1)
    mixup_switch_prob: float = opt(0.5, "probability of cutmix instead of mixup when both are on", ge=0, le=1)
    clip_grad: Optional[float] = opt(None, "clip the gradient norm to this value", gt=0)

    def check_rules(self) -> None:
        super().check_rules()
        self.check_augment()

    def check_augment(self) -> None:
        """Build timm's fine-tuning transform now, as the run will: a policy timm rejects
        (aa: foo) fails here in one line, not in a worker mid-epoch."""
        from dataio.augment import finetune_transform
        try:
            finetune_transform(self, self.input_size or 32, (0.5,) * 3, (0.5,) * 3)
        except Exception as e:  # timm asserts (AssertionError) or raises ValueError/KeyError
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"aa {self.aa!r} is not a RandAugment policy timm accepts ({why}); e.g. "
                            f"rand-m9-mstd0.5-inc1, or '' for none")

    def default_run_name(self) -> str:
        return "finetune"


@dataclass
class LinprobeConfig(EvalConfig):
    """main_linprobe.py: frozen encoder, BatchNorm + linear head, LARS (REFERENCE.md section 1)."""
    epochs: int = opt(100, "probe epochs", ge=1)
    blr: float = opt(0.1, "base learning rate: lr = blr * global batch / 256", gt=0)
    weight_decay: float = opt(0.0, "LARS weight decay", ge=0)
    warmup_epochs: int = opt(10, "linear warm-up epochs before the cosine decay", ge=0)
    pool: str = opt("cls", "probe features: cls token or mean of patch tokens", "models_vit.POOLS")
    aug: bool = opt(True, "RandomResizedCrop + flip on training images (ignored with --cached_features)")
    cached_features: bool = opt(False, "fast path: extract features once, without augmentation, "
                                       "and train the head on them")
    knn: bool = opt(False, "also report weighted kNN accuracy of the frozen features")
    knn_k: int = opt(20, "kNN: neighbours", ge=1)
    knn_t: float = opt(0.07, "kNN: temperature of the similarity weights", gt=0)

    def default_run_name(self) -> str:
        return "linprobe"


SECTIONS: Dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig,
                             "linprobe": LinprobeConfig}

# --help as a table of contents: every flag in one group, in this order (a script shows the
# groups it has flags in). The options of a target kind form a group of their own, named after the
# kinds that read them (target_encoder: each kind's `options`), after "target".
HELP_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("data", ("dataset", "data_path", "train_subset", "data_loader", "num_workers", "input_size", "norm_mean",
              "norm_std")),
    ("schedule", ("epochs", "batch_size", "accum_iter", "blr", "lr", "min_lr", "weight_decay", "warmup_epochs")),
    ("model and masking", ("model", "mask_ratio", "norm_pix_loss")),
    ("starting point", ("finetune", "checkpoint_key", "from_scratch")),
    ("target", ("target",)),
    ("improved targets (any kind with a feature phase)", ("target_layers", "target_norm", "target_prenorm",
                                                          "pixel_weight", "feature_ramp", "num_masks",
                                                          "feature_decoder", "stage_reset")),
    ("recipe details (report / official MAE / independent loop)", ("wd_norm_bias", "crop_interpolation",
                                                                   "feature_head_init")),
    ("fine-tuning recipe", ("layer_decay", "drop_path", "global_pool", "smoothing", "aa", "reprob", "remode",
                            "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "clip_grad")),
    ("linear probe and kNN (pretraining: the kNN monitor)", ("pool", "aug", "cached_features", "knn", "knn_every", "knn_pool", "knn_k", "knn_t")),
    ("run, speed and faults", ("config", "output_dir", "device", "seed", "resume", "save_freq", "print_freq",
                               "precision", "compile", "skip_nonfinite")),
)


def help_groups(cls: type) -> List[Tuple[str, List[str]]]:
    """(title, field names) of `cls` in --help order; target-kind options after "target"."""
    from target_encoder import TARGETS
    names = {f.name for f in dataclasses.fields(cls)}
    kinds: Dict[str, List[str]] = {}  # option -> the kinds reading it
    for kind, target in TARGETS.items():
        for o in target.options:
            kinds.setdefault(o, []).append(kind)
    by_kinds: Dict[str, List[str]] = {}
    for o, readers in kinds.items():
        by_kinds.setdefault(f"--target {' / '.join(readers)}", []).append(o)
    out = []
    for title, fields in HELP_GROUPS:
        out.append((title, [f for f in fields if f in names]))
        if title == "target":
            out += [(t, [o for o in opts if o in names]) for t, opts in by_kinds.items()]
    return [(title, fields) for title, fields in out if fields]


# ---- checking fields against their metadata ---------------------------------------------------

_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def bounds_text(meta: typing.Mapping[str, Any]) -> str:
    """'>= 1', '> 0', 'in [0, 1)': a field's bounds as a message reads them ('' if none)."""
    lo = next(((k, meta[k]) for k in ("ge", "gt") if meta.get(k) is not None), None)
    hi = next(((k, meta[k]) for k in ("le", "lt") if meta.get(k) is not None), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
    k, v = lo or hi or (None, None)
    return f"{_BOUNDS[k][1]} {v}" if k else ""


def check_field(f: dataclasses.Field, value: Any, where: str = "") -> None:
    """Raise UserError if `value` breaks what field `f` accepts. where: message prefix ("FILE: ")."""
    name, meta = f.name, f.metadata
    if value is None:  # an Optional field left unset
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # e.g. a path from argv holding a byte that is not UTF-8
            raise UserError(f"{where}{name} {value!r} holds a byte that is not UTF-8; the config is saved "
                            f"as UTF-8 YAML, so use a UTF-8 name")
        choices = choices_of(f)
        if choices is not None and value not in choices and not (meta.get("blank") and value == ""):
            raise UserError(f"{where}unknown {name} {value!r}; choose from {', '.join(map(str, choices))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}{name} must be a finite number, got {value}")
    if not all(op(value, meta[k]) for k, (op, _) in _BOUNDS.items() if meta.get(k) is not None):
        raise UserError(f"{where}{name} must be {bounds_text(meta)}, got {value}")


def check_fields(cfg: Any, sources: Dict[str, str]) -> None:
    """Every field of `cfg` against its metadata, in declaration order."""
    for f in dataclasses.fields(cfg):
        check_field(f, getattr(cfg, f.name), sources.get(f.name, ""))


# ---- parsing ----------------------------------------------------------------------------------

class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may override: allowed
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(f"duplicate key {key!r} (line {key_node.start_mark.line + 1}); "
                                    f"each key may appear once per mapping")
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
        hint = ""
        if base is float and isinstance(value, str) and _is_float(value):
            hint = " (YAML reads a number without a dot as text: write e.g. 1.0e-3)"
        raise UserError(f"{where}: {key} must be {base.__name__}, got {value!r}{hint}")
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_yaml(path: str) -> Dict[str, Any]:
    """A config file's mapping; UserError if it is missing, unreadable, not UTF-8 or not YAML."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror or e})")
    except _DuplicateKey as e:
        raise UserError(f"{path}: {e}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]}{at})")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    return raw


def load_yaml(path: str, cls: type, section: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read a config file for `cls`, checking keys and types.

    Returns {key: value} and {key: where it was written} ("FILE: " or "FILE [section]: ",
    the prefix of messages about that value).
    """
    raw = read_yaml(path)
    hints = typing.get_type_hints(cls)
    for name, sub_cls in SECTIONS.items():  # other scripts' sections: check the keys, then skip
        sub = raw.get(name, {})
        if not isinstance(sub, dict):
            raise UserError(f"{path}: section {name!r} must be a mapping")
        bad = sorted(map(str, set(sub) - set(typing.get_type_hints(sub_cls))))
        if bad:
            raise UserError(f"{path}: unknown key(s) in section {name!r}: {', '.join(bad)}")
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for where, block in ((path, top), (f"{path} [{section}]", raw.get(section, {}))):
        for key, value in block.items():
            if key not in hints or key == "config":
                raise UserError(f"{where}: unknown key {key!r} for {section}")
            values[key] = _check_type(key, value, hints[key], where)
            sources[key] = f"{where}: "
    return values, sources


def build_parser(cls: type, defaults: Dict[str, Any], prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The script's flags, one per field. A flag not given is absent from the parsed result
    (argparse.SUPPRESS), so `parse_config` knows which values the command line set;
    `defaults` (defaults < YAML) only appear in --help."""
    parser = ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0],
                            argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for title, names in help_groups(cls):
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, fields.pop(name), hints, defaults)
    for f in fields.values():  # a field no group names (test_config refuses such a field)
        _add_flag(parser, f, hints, defaults)
    return parser


def _add_flag(parser, f: dataclasses.Field, hints: Dict[str, Any], defaults: Dict[str, Any]) -> None:
    """--NAME for field f: its type, choices and help (with the default shown)."""
    tp, meta = _base_type(hints[f.name]), f.metadata
    help_text = f"{meta.get('help', '')} (default: {defaults[f.name]!r})".replace("%", "%%")
    kwargs: Dict[str, Any] = {"help": help_text}
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = tp
        choices = choices_of(f)
        if choices and meta.get("cli_choices", True):
            kwargs["choices"] = choices
    parser.add_argument(f"--{f.name}", **kwargs)


def parse_config(cls: type, section: str, argv: Optional[List[str]] = None):
    """defaults < YAML < flags, then every value validated wherever it came from.

    Raises UserError (one line) on bad input, before the script does any work.
    """
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    values, sources = cls().to_dict(), {}
    if known.config:
        from_yaml, sources = load_yaml(known.config, cls, section)
        values.update(from_yaml)
    flags = vars(build_parser(cls, values).parse_args(argv))
    values.update(flags)
    sources.update({key: "" for key in flags})
    cfg = cls(**values)
    cfg.given = frozenset(sources)
    if cfg.resume:  # rules between fields wait for the checkpoint's values (util.rundir)
        check_fields(cfg, sources)
    else:
        cfg.validate(sources)
    return cfg

