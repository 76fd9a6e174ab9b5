"""Masked autoencoder with a ViT encoder, a light decoder and two prediction heads.

Architecture only: what the decoder regresses (pixels or target-encoder features) is
decided by `target_encoder.py` and passed to the loss as an argument.

Shapes used throughout (N images, L = (H/p)*(W/p) patches, D encoder width):
    imgs:   (N, C, H, W)
    tokens: (N, L, D)          patch tokens in raster order
    mask:   (N, L)             0 is keep, 1 is remove
"""
from functools import partial
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from models_arch import ARCHS, MAE_PREFIX, Arch, ArchModels

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed(grid_size: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (1, [1 +] grid_size**2, dim); the cls slot is zeros."""
    pe = build_sincos2d_pos_embed([grid_size, grid_size], dim=dim)
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample, by argsort of uniform noise (no Python loop).

    Args:
        x: (N, L, D) tokens.
        noise: (N, L) uniform noise deciding the mask (drawn here when None); passing it lets
            data-parallel ranks take their rows of one global draw.
    Returns:
        x_kept: (N, L_keep, D) with L_keep = int(L * (1 - mask_ratio)),
        mask: (N, L), 0 is keep, 1 is remove, in the original token order,
        ids_restore: (N, L) permutation that puts the shuffled sequence back in order.
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


class MAEEncoder(nn.Module):
    """ViT encoder with a cls token and fixed sin-cos position embeddings.

    Attribute names match timm's VisionTransformer (patch_embed, cls_token, pos_embed,
    blocks, norm), so its state_dict loads into `models_vit` for fine-tuning and probing
    without renaming. The same class serves as the online encoder and the target encoder.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, norm_layer: Callable[..., nn.Module] = LayerNorm):
        super().__init__()
        self.num_prefix_tokens = 1  # the cls token (timm's name: models_vit.resize_pos_embed reads it)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not learned (as in MAE): kept a Parameter so the key matches timm's ViT.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed(self.patch_embed.grid_size[0], embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

    def _embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, D) patch tokens with position embeddings, raster order."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_masked(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only.

        Returns:
            latent: (N, 1 + L_keep, D) normalised, cls first,
            mask: (N, L), ids_restore: (N, L) as in `random_masking`.
        """
        x, mask, ids_restore = random_masking(self._embed(imgs), mask_ratio, noise)
        x = self._prepend_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_blocks(self, imgs: torch.Tensor) -> list:
        """Unmasked pass that keeps patch order: every block's output, each (N, 1 + L, D).

        No masking and no shuffling happen here, so token 1 + i always comes from patch i
        (MAE's masked pass with mask_ratio=0 would still permute the tokens).
        """
        x = self._prepend_cls(self._embed(imgs))
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        return outs

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked, order-preserving pass: (N, C, H, W) -> (N, 1 + L, D) after the final norm."""
        return self.norm(self.forward_blocks(imgs)[-1])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_features(imgs)


# Initialisations of the feature head (--feature_head_init): nn.Linear's default (the report's code:
# a fresh torch.nn.Linear made at the switch), or xavier like every other Linear (official MAE).
HEAD_INITS = ("torch", "xavier")
REPORT_HEAD_INIT = HEAD_INITS[0]


# --feature_decoder: the feature head on the pixel head's decoder, or on a decoder of its own.
FEATURE_DECODERS = ("shared", "separate")


def decode(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor,
           blocks: nn.ModuleList, norm: nn.Module) -> torch.Tensor:
    """(N, 1 + L_keep, D_dec) embedded visible tokens -> (N, L, D_dec) decoded tokens in raster
    order: mask tokens fill the removed places, position embeddings are added, blocks run."""
    n, l_all = ids_restore.shape
    mask_tokens = mask_token.expand(n, l_all + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
    x = torch.cat([x[:, :1, :], x_], dim=1) + pos_embed
    for blk in blocks:
        x = blk(x)
    return norm(x)[:, 1:, :]


class Decoder(nn.Module):
    """An MAE decoder on its own (the separate feature decoder): embed, mask token, fixed sin-cos
    position embeddings, blocks, norm. forward(latent (N, 1 + L_keep, D), ids_restore (N, L))
    -> (N, L, D_dec)."""

    def __init__(self, embed_dim: int, grid: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(grid, dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(dim)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return decode(self.embed(latent), ids_restore, self.mask_token, self.pos_embed, self.blocks, self.norm)


class MaskedAutoencoderViT(nn.Module):
    """MAE: masked ViT encoder + transformer decoder with a pixel head and a feature head.

    Both heads exist from construction, so both are in the optimizer from step 0; which
    one is trained at a given epoch is the target schedule's decision, not the model's.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer: Callable[..., nn.Module] = LayerNorm,
                 feature_head_init: str = REPORT_HEAD_INIT, feature_decoder: str = "shared",
                 feature_dim: Optional[int] = None):
        super().__init__()
        if feature_decoder not in FEATURE_DECODERS:
            raise ValueError(f"feature_decoder must be one of {FEATURE_DECODERS}, not {feature_decoder!r}")
        if feature_head_init not in HEAD_INITS:
            raise ValueError(f"feature_head_init must be one of {HEAD_INITS}, not {feature_head_init!r}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.encoder = MAEEncoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                                  mlp_ratio, norm_layer)
        num_patches = self.encoder.num_patches
        grid = self.encoder.patch_embed.grid_size[0]

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(grid, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)  # pixel head
        # feature head: as wide as the target's tokens (target_encoder.Target.feature_dim; default
        # the encoder's width, for copies of the encoder)
        self.decoder_pred_feat = nn.Linear(decoder_embed_dim, feature_dim or embed_dim)
        # BootMAE: the feature head reads its own decoder (same shape) instead of the pixel head's
        self.feature_decoder = None if feature_decoder == "shared" else Decoder(
            embed_dim, grid, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_layer)
        self.heads = {"pixel": "decoder_pred", "feature": "decoder_pred_feat"}
        assert num_patches == grid * grid
        self.initialize_weights(feature_head_init)

    def initialize_weights(self, feature_head_init: str = REPORT_HEAD_INIT) -> None:
        # The patch projection is a linear map on flattened patches: init it like one.
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.feature_decoder is not None:
            nn.init.normal_(self.feature_decoder.mask_token, std=0.02)
        self.apply(self._init_weights)
        if feature_head_init == "torch":  # nn.Linear's own init: kaiming-uniform(a=sqrt 5), uniform bias
            self.decoder_pred_feat.reset_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            # xavier_uniform, following the official ViT/MAE (timm's default is trunc_normal)
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (p, p, C)."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        assert h % p == 0 and w % p == 0
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W), inverse of `patchify` for square images."""
        p, c = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(N, 1 + L_keep, D) encoder output -> (N, L, D_dec) decoder tokens in raster order."""
        return decode(self.decoder_embed(latent), ids_restore, self.mask_token, self.decoder_pos_embed,
                      self.decoder_blocks, self.decoder_norm)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                heads: Sequence[str] = ("pixel",), noise: Optional[torch.Tensor] = None
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Mask, encode, decode, and apply the requested heads.

        Returns:
            preds: {"pixel": (N, L, p*p*C), "feature": (N, L, feature_dim)} for the heads asked for,
            mask: (N, L), 0 is keep, 1 is remove.
        """
        latent, mask, ids_restore = self.encoder.forward_masked(imgs, mask_ratio, noise)
        decoded: Dict[bool, torch.Tensor] = {}  # each decoder runs once, whatever reads it
        preds = {}
        for h in heads:
            own = h == "feature" and self.feature_decoder is not None  # --feature_decoder separate
            if own not in decoded:
                decoded[own] = (self.feature_decoder if own else self.forward_decoder)(latent, ids_restore)
            preds[h] = getattr(self, self.heads[h])(decoded[own])
        return preds, mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the removed patches only.

    pred, target: (N, L, K); mask: (N, L), 1 is remove. Returns a scalar.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _build_mae(arch: Arch, **overrides) -> MaskedAutoencoderViT:
    arch.grid(overrides.get("img_size", 32))  # refuse a side the patch does not divide
    return MaskedAutoencoderViT(**{**arch.mae_kwargs(), **overrides})


# Registry for --model: "mae_<name>" for every architecture in models_arch.ARCHS (the numbers
# live there, shared with the classifiers of models_vit).
MODELS: Mapping[str, Callable[..., MaskedAutoencoderViT]] = ArchModels(MAE_PREFIX, _build_mae)


def arch_of(name: str) -> Arch:
    """The models_arch entry of a registry model name (mae_* or its encoder's)."""
    return ARCHS[name[len(MAE_PREFIX):] if name.startswith(MAE_PREFIX) else name]


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**overrides)


def num_patches(model_name: str, img_size: int = 32) -> int:
    """Patches per image (L) of a registry model; built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        return create_model(model_name, img_size=img_size).encoder.num_patches
