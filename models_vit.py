"""Classifiers for fine-tuning and linear probing, built on timm's VisionTransformer.

The pretraining encoder (`models_mae.MAEEncoder`) uses timm's attribute names, so its
state_dict loads here directly: only the decoder and the MAE's heads are dropped.
"""
import math
from functools import partial
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from models_arch import MAE_PREFIX, Arch, ArchModels
from util.errors import UserError

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _build_vit(arch: Arch, num_classes: int = 10, global_pool: bool = False, drop_path_rate: float = 0.0,
               img_size: int = 32, in_chans: int = 3) -> VisionTransformer:
    arch.grid(img_size)  # refuse a side the patch does not divide
    # global_pool=True: average patch tokens, then a fresh fc_norm (MAE's fine-tuning
    # default); False: the cls token after the pretrained final norm.
    return VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                             global_pool="avg" if global_pool else "token",
                             drop_path_rate=drop_path_rate, qkv_bias=True,
                             norm_layer=LayerNorm, **arch.encoder_kwargs())


# Encoders matching models_mae.MODELS ("mae_<name>" pretrains into "<name>"), built from the
# same numbers (models_arch.ARCHS).
MODELS: Mapping[str, Callable[..., VisionTransformer]] = ArchModels("", _build_vit)
DEFAULT_MODEL = "vit_tiny_patch4"
POOLS = ("cls", "avg")  # features: the cls token, or the mean of patch tokens (pool_tokens)
CHECKPOINT_KEYS = ("model", "target")  # encoder taken from a pretraining checkpoint: online or target


def create_model(name: str, **kwargs) -> VisionTransformer:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def encoder_name_for(pretrain_model: str) -> str:
    """models_mae name -> models_vit name (mae_vit_tiny_patch4 -> vit_tiny_patch4)."""
    return pretrain_model[len(MAE_PREFIX):] if pretrain_model.startswith(MAE_PREFIX) else pretrain_model


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, 1 + L, D) normalised tokens -> (N, D): the cls token, or the mean of patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


class LinearProbe(nn.Module):
    """Frozen encoder + BatchNorm (no affine) + linear head, as in MAE's linear probing.

    The encoder stays in eval mode whatever `train()` is called with, and has no trainable
    parameters, so only the head learns.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str = "cls"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.encoder.requires_grad_(False)
        dim = encoder.embed_dim
        # BatchNorm without affine whitens the features, which makes LARS's lr robust.
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D), without autograd (the encoder is frozen)."""
        with torch.no_grad():
            return pool_tokens(self.encoder.forward_features(x), self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pretrained_encoder_state(ckpt: dict, key: str, path: str) -> Dict[str, torch.Tensor]:
    """The encoder weights of a pretraining checkpoint, with timm ViT key names.

    key: "model" = the online encoder, "target" = the target encoder.
    """
    if key == "target":
        if ckpt.get("target") is None:
            raise UserError(f"{path}: has no target encoder (a pixel run, or saved before the switch "
                            f"epoch); use --checkpoint_key model")
        if not isinstance(ckpt["target"], dict):
            raise UserError(f"{path}: its 'target' is a {type(ckpt['target']).__name__}, not encoder weights")
        return dict(ckpt["target"])
    prefix = "encoder."
    model = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    state = {k[len(prefix):]: v for k, v in model.items() if str(k).startswith(prefix)}
    if not state:  # else every encoder weight would be reported missing, as if --model were wrong
        raise UserError(f"{path}: its 'model' holds no pretrained encoder ('encoder.*' weights); "
                        f"not a pretraining checkpoint of this project")
    return state


def check_input_channels(state: Dict[str, torch.Tensor], in_chans: int, path: str,
                         key: str = "patch_embed.proj.weight", pretrained_on: Optional[str] = None) -> None:
    """Refuse weights pretrained on images with another channel count than this run's data.

    The patch embedding's input channels follow the dataset (Fashion-MNIST 1, the others 3), so
    a mismatch there means another --dataset, not another --model: say so before the shape check.
    key: where the patch embedding is in `state` ("encoder.patch_embed.proj.weight" in a
    pretraining checkpoint's "model"); pretrained_on: the checkpoint's dataset, when known.
    """
    weight = state.get(key)
    if isinstance(weight, torch.Tensor) and weight.ndim == 4 and weight.shape[1] != in_chans:
        was = f" ({pretrained_on})" if pretrained_on else ""
        raise UserError(f"{path}: pretrained on {weight.shape[1]}-channel images{was}, but this run's data "
                        f"has {in_chans} channel{'s' * (in_chans != 1)}; use the same --dataset as the pretraining")


def resize_pos_embed(state: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Fit the checkpoint's position embeddings to the model's patch grid.

    state["pos_embed"]: (1, prefix + G*G, D) from pretraining at G x G patches; the model wants
    (1, prefix + G'*G', D). Another grid (pretrained at another --input_size) is resampled
    bicubically by timm, prefix (cls) slots kept, and one line says so. Returns a new dict when
    it changed anything, `state` itself otherwise (same grid: the load stays exact).
    """
    pos = state.get("pos_embed")
    want = model.pos_embed
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or pos.shape[1:] == want.shape[1:]:
        return state  # nothing to resize; a wrong width is reported by the shape check
    prefix = model.num_prefix_tokens
    old = math.isqrt(pos.shape[1] - prefix)
    if old * old != pos.shape[1] - prefix or pos.shape[2] != want.shape[2]:
        return state  # not a square grid of this width: left to the shape check to refuse
    new = list(model.patch_embed.grid_size)
    resized = resample_abs_pos_embed(pos, new_size=new, old_size=[old, old], num_prefix_tokens=prefix)
    print(f"position embeddings interpolated from {old}x{old} to {new[0]}x{new[1]} patches")
    return {**state, "pos_embed": resized}


def load_pretrained_encoder(model: VisionTransformer, state: Dict[str, torch.Tensor], path: str,
                            pretrained_on: Optional[str] = None) -> str:
    """Load encoder weights into a classifier; refuse anything but the expected gaps.

    Expected: the classifier head is new; with global pooling fc_norm is new and the
    pretrained final norm is unused. Weights pretrained at another input size load with their
    position embeddings interpolated to this model's grid (`resize_pos_embed`). Returns a one-line report of what was not loaded.
    pretrained_on: the checkpoint's --dataset, named when the channel counts differ.
    """
    own = model.state_dict()
    check_input_channels(state, own["patch_embed.proj.weight"].shape[1], path, pretrained_on=pretrained_on)
    state = resize_pos_embed(state, model)
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise UserError(f"{path}: architecture mismatch, {k} is {tuple(state[k].shape)} in the checkpoint "
                        f"but {tuple(own[k].shape)} in the model (pass the matching --model)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = ("head.", "fc_norm.")
    allowed_unexpected = ("norm.",) if isinstance(model.norm, nn.Identity) else ()
    wrong = [k for k in missing if not k.startswith(allowed_missing)]
    wrong += [k for k in unexpected if not k.startswith(allowed_unexpected)]
    if wrong:
        raise UserError(f"{path}: architecture mismatch ({len(wrong)} keys differ, e.g. {wrong[0]}); "
                        f"pass the matching --model")
    return f"missing keys (new): {sorted(missing)}; unused keys: {sorted(unexpected)}"
