"""A pretraining checkpoint's encoders as timm-ready safetensors files (export_encoders; the
command line is export_weights.py; pretraining calls it at its end). It writes into DIR
(default: the checkpoint's directory)
    encoder.safetensors              the online encoder (checkpoint["model"], "encoder.*" keys)
    target_encoder.safetensors       the target encoder, when the run has one (checkpoint["target"])
    target_slow_encoder.safetensors  the dual target's every-K snapshot, when present ("target_slow")
each in timm VisionTransformer key names (cls_token, pos_embed, patch_embed.proj.*, blocks.N.*,
norm.*; no head), float32, with the timm call, input size and normalisation in the file's
metadata, and the checkpoint it came from ("source", "epochs_trained", "step": the files of one
export agree on them). The files are one set: those an earlier export left in DIR that this
checkpoint has no entry for (a target encoder, exporting from before the switch) are removed.
Load one in timm with the call this prints, e.g. for mae_vit_base_patch16 at 224:

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0, img_size=224,
                      pretrained_cfg_overlay=dict(file="encoder.safetensors"))

and for sizes timm has no name for (patch 4, the smoke models) the architecture as keywords:

    timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
                      patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
                      pretrained_cfg_overlay=dict(file="encoder.safetensors"))

model(x) then gives the cls token after the final norm (N, D), the project's `--pool cls`
feature; model.forward_features(x) all tokens (N, 1 + L, D), equal to models_mae.MAEEncoder's
forward_features. For the mean of patch tokens (`--pool avg`) add global_pool="avg",
fc_norm=False (timm's default for "avg" puts a new, untrained norm after the pooling instead
of the pretrained one). Another img_size resamples the position embeddings on load (timm);
dynamic_img_size=True accepts any input size at run time. Feed images normalised with the
mean/std in the metadata (those of the pretraining run).
"""
import json
import math
import os
from types import SimpleNamespace
from typing import Dict, Optional

import torch
from safetensors.torch import save as safetensors_bytes

from dataio.datasets import normalization
from models_arch import ARCHS, Arch
from models_vit import encoder_name_for, pretrained_encoder_state
from util.checkpoint import atomic_write, load_checkpoint
from util.errors import UserError

# checkpoint entry -> file written from it (the entry's absence or None: no file)
FILES = {"model": "encoder.safetensors", "target": "target_encoder.safetensors",
         "target_slow": "target_slow_encoder.safetensors"}


def _arch(model_name: str) -> Arch:
    name = encoder_name_for(model_name)
    if name not in ARCHS:
        raise UserError(f"unknown model {model_name!r}: not in models_arch.ARCHS ({', '.join(ARCHS)})")
    return ARCHS[name]


def timm_call(model_name: str, img_size: int, in_chans: int, file: str) -> str:
    """The exact timm.create_model(...) line that loads `file` exported from `model_name`
    (a models_mae or models_vit name) as a feature extractor at img_size."""
    timm_name, arch = _arch(model_name).timm_model()
    kwargs = dict(num_classes=0, img_size=img_size, **({} if in_chans == 3 else {"in_chans": in_chans}), **arch)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({timm_name!r}, pretrained=True{args}, pretrained_cfg_overlay=dict(file={file!r}))"


def encoder_state(ckpt: dict, key: str, path: str) -> Dict[str, torch.Tensor]:
    """The encoder under checkpoint entry `key` (see FILES), the checkpoint's own tensors (no
    copy). "target" and "target_slow" already hold encoder state_dicts in timm names; "model"
    holds the whole MAE, its encoder under "encoder."."""
    entry = ckpt if key == "model" else {"target": ckpt[key]}
    state = pretrained_encoder_state(entry, "model" if key == "model" else "target", path)
    lacking = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in state]
    if lacking:  # the input size is read from them
        raise UserError(f"{path}: its {key!r} encoder has no {', '.join(lacking)}: not a ViT encoder of this project")
    return state


def _stored(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """float32, contiguous, unshared tensors: what safetensors stores."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def _normalization(cfg: dict) -> Dict[str, str]:
    """The mean/std the pretraining run fed its encoder with (JSON lists), blank if unknown."""
    try:
        mean, std = normalization(SimpleNamespace(dataset=cfg.get("dataset", ""), norm_mean=cfg.get("norm_mean", ""),
                                                  norm_std=cfg.get("norm_std", "")))
    except (UserError, KeyError, AttributeError):
        return {"norm_mean": "", "norm_std": ""}
    return {"norm_mean": json.dumps(list(mean)), "norm_std": json.dumps(list(std))}


def export_encoders(ckpt_path: str, out_dir: Optional[str] = None) -> Dict[str, str]:
    """Write the checkpoint's encoders as safetensors in timm ViT key names (see the module doc).

    Returns {path written: the timm.create_model call that loads it}.
    """
    ckpt = load_checkpoint(ckpt_path, kind="pretrain", require=("model", "config"))
    cfg = ckpt["config"]
    _arch(cfg["model"])  # refuse an unknown model before creating anything
    # pixel runs, and bootstrapped runs before the switch, have no target
    keys = [key for key in FILES if key == "model" or ckpt.get(key) is not None]
    sources = {key: encoder_state(ckpt, key, ckpt_path) for key in keys}  # refused before touching DIR
    out_dir = out_dir or os.path.dirname(os.path.abspath(ckpt_path))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {out_dir} ({e.strerror or e})")
    # Files of an earlier export that this one does not replace would pair with encoders they were
    # not trained with: removed first, so no kill leaves this export's files beside them.
    stale = [os.path.join(out_dir, FILES[k]) for k in FILES if k not in keys
             and os.path.exists(os.path.join(out_dir, FILES[k]))]
    for path in stale:
        try:
            os.remove(path)
        except OSError as e:
            raise UserError(f"cannot remove {path}, left by an earlier export ({e.strerror or e})")
    if stale:
        print(f"removed {', '.join(stale)}: left by an earlier export, and {ckpt_path} (epoch "
              f"{ckpt.get('epoch', '?')}) has no such encoder")
    written = {}
    for key in keys:
        filename = FILES[key]
        state = _stored(sources[key])
        # The input size the weights were trained at, from the weights themselves: (1, 1 + G*G, D)
        # position embeddings and (D, C, p, p) patches.
        _, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * patch
        path = os.path.join(out_dir, filename)
        call = timm_call(cfg["model"], img_size, in_chans, path)
        meta = {"format": "pt", "source": os.path.abspath(ckpt_path), "checkpoint_key": key,
                "model": str(cfg["model"]), "epochs_trained": str(ckpt.get("epoch", "")),
                "step": str(ckpt.get("step", "")), "img_size": str(img_size),
                "in_chans": str(in_chans), "dataset": str(cfg.get("dataset", "")), "timm_call": call,
                **_normalization(cfg)}
        atomic_write(path, safetensors_bytes(state, metadata=meta))
        written[path] = call
    return written
