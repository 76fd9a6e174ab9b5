"""What fine-tuning and probing do before touching data: device, seeding, where the run starts
(its own checkpoint, a pretraining run, or nothing), its model name and its output directory."""
import glob
import os
from dataclasses import dataclass
from typing import Optional

import torch

from models_vit import DEFAULT_MODEL, encoder_name_for, load_pretrained_encoder, pretrained_encoder_state
from util import distributed as dist
from util.checkpoint import load_checkpoint
from util.errors import UserError
from util.memory import check_step_fits
from util.rundir import prepare_output_dir
from util.runtime import resolve_device, resolve_precision

OUTPUT_ROOT = "output"
DEFAULT_INPUT_SIZE = 32  # the report's; every run from before --input_size was 32x32
RESUME_KEYS = ("model", "optimizer", "config", "epoch", "step", "best_acc1", "last")  # what continuing reads


def find_newest_pretrain(root: str = OUTPUT_ROOT) -> Optional[str]:
    """Newest checkpoint-last.pth under `root` that belongs to a pretraining run."""
    candidates = sorted(glob.glob(os.path.join(root, "**", "checkpoint-last.pth"), recursive=True),
                        key=os.path.getmtime, reverse=True)
    for path in candidates:
        try:  # only the kind is read here: the weights are checked when the chosen one is loaded
            if load_checkpoint(path, check_weights=False)["kind"] == "pretrain":
                return path
        except UserError:
            continue
    return None


@dataclass
class Start:
    init: Optional[str] = None    # pretraining checkpoint whose encoder initialises the model
    init_ckpt: Optional[dict] = None
    resume: Optional[str] = None  # this script's own checkpoint to continue


def resolve_start(cfg, kind: str) -> Start:
    """Decide from the flags where to start; prints what it chose. `kind`: finetune | linprobe."""
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume, require=("model", "kind", "config"))
        if ckpt["kind"] == "pretrain":
            print(f"{cfg.resume} is a pretraining checkpoint: initialising from it (as --finetune)")
            return Start(init=cfg.resume, init_ckpt=ckpt)
        if ckpt["kind"] != kind:
            raise UserError(f"{cfg.resume}: a {ckpt['kind']} checkpoint, cannot resume {kind} from it")
        return Start(resume=cfg.resume)
    if cfg.from_scratch:
        return Start()
    path = cfg.finetune
    if not path:
        path = find_newest_pretrain()
        if path is None:
            raise UserError(f"no pretraining checkpoint found under {OUTPUT_ROOT}/; pass --finetune CKPT "
                            f"(or --resume CKPT), or --from_scratch")
        print(f"using the newest pretraining checkpoint: {path}")
    return Start(init=path, init_ckpt=load_checkpoint(path, kind="pretrain", require=("model", "config")))


def run_name(start: Start, cfg, kind: str) -> str:
    """output/<kind>_<pretraining run>[_target] or output/<kind>_scratch."""
    if start.init is None:
        return f"{kind}_scratch"
    name = os.path.basename(os.path.dirname(os.path.abspath(start.init)))
    return f"{kind}_{name}" + ("_target" if cfg.checkpoint_key == "target" else "")


def setup_eval_run(cfg, kind: str):
    """Everything fine-tuning and probing do before touching data: device (and torchrun),
    seeding, where to start, the resolved config, a checked output directory, and whether one
    step fits in memory (util/memory.py).

    Returns (device, start, own_ckpt).
    """
    device = dist.init_distributed(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)  # model initialisation, identical on every rank
    start, own = prepare_run(cfg, kind)
    cfg.resolve(world_size=dist.world())
    cfg.precision = resolve_precision(cfg.precision, device, own["config"].get("precision") if own else None)
    prepare_output_dir(cfg, start.resume, own, write=dist.is_main())
    check_step_fits(cfg, kind, device)
    return device, start, own


def load_pretrained(model: torch.nn.Module, cfg, start: Start, own: Optional[dict], verb: str) -> None:
    """A new run from a pretraining checkpoint: its encoder (cfg.checkpoint_key) into `model`,
    said in one line ("`verb` MODEL from CKPT [key]: what loaded"). Nothing when the run continues
    its own checkpoint (which holds every weight) or starts from scratch."""
    if own is not None or start.init is None:
        return
    state = pretrained_encoder_state(start.init_ckpt, cfg.checkpoint_key, start.init)
    report = load_pretrained_encoder(model, state, start.init, pretrained_on=start.init_ckpt["config"].get("dataset"))
    print(f"{verb} {cfg.model} from {start.init} [{cfg.checkpoint_key}]: {report}")


def inherit_from_pretraining(cfg, pretrained: dict) -> None:
    """What an unset flag takes from the run this one starts from (a pretraining run, or this
    run's own checkpoint): --input_size (0), and on the same dataset --norm_mean/--norm_std, so
    the encoder is evaluated on inputs sized and scaled as it learned them. Said when it happens."""
    if not cfg.input_size:
        cfg.input_size = pretrained.get("input_size", DEFAULT_INPUT_SIZE)  # older runs: all 32x32
        print(f"input_size {cfg.input_size} (from the pretraining run)")
    else:
        note_input_size(cfg, pretrained)
    if pretrained.get("dataset") != cfg.dataset:
        return
    for key in ("norm_mean", "norm_std"):
        if not getattr(cfg, key) and pretrained.get(key):
            setattr(cfg, key, pretrained[key])
            print(f"{key} {pretrained[key]} (from the pretraining run)")


def note_input_size(cfg, pretrained: dict) -> None:
    """Say so when --input_size differs from the pretraining run's: the position embeddings are
    interpolated to it (models_vit.load_pretrained_encoder says from which grid to which)."""
    was = pretrained.get("input_size", DEFAULT_INPUT_SIZE)
    if was != cfg.input_size:
        print(f"note: pretrained at {was}x{was}, this run takes {cfg.input_size}x{cfg.input_size} (--input_size)")


def prepare_run(cfg, kind: str):
    """Resolve start, output directory, own checkpoint (auto-resume) and model name, in place.

    Returns (start, own_ckpt): own_ckpt is this run's checkpoint to continue, or None.
    """
    start = resolve_start(cfg, kind)
    if not cfg.output_dir:
        cfg.output_dir = os.path.join(OUTPUT_ROOT, run_name(start, cfg, kind))
    last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    if start.resume is None and os.path.isfile(last):
        start.resume = last
    own = load_checkpoint(start.resume, kind=kind, require=RESUME_KEYS) if start.resume else None
    if own is not None:
        cfg.model = own["config"]["model"]
        start.init = own.get("init")
        inherit_from_pretraining(cfg, own["config"])
    elif start.init_ckpt is not None:
        pretrained = start.init_ckpt["config"]["model"]
        encoder = encoder_name_for(pretrained)
        if cfg.model and cfg.model != encoder:
            raise UserError(f"{start.init}: architecture mismatch, pretrained {pretrained} has encoder "
                            f"{encoder} but --model is {cfg.model}")
        cfg.model = encoder
        inherit_from_pretraining(cfg, start.init_ckpt["config"])
    else:
        cfg.model = cfg.model or DEFAULT_MODEL
        cfg.input_size = cfg.input_size or DEFAULT_INPUT_SIZE
    return start, own
