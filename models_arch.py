"""The one registry of architecture numbers: the MAE pretraining models (models_mae.MODELS,
"mae_<name>") and the classifier encoders (models_vit.MODELS, "<name>") are both built from
ARCHS, read live, so a new size is one entry here (even one added at run time).

Any input side N that is a multiple of the patch size works (the grid is N/p x N/p); the
numbers below do not depend on N.
"""
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

from util.errors import UserError

# A registered timm ViT (learned abs. pos embed, cls token, qkv bias, LayerNorm eps 1e-6, no
# layer scale, like ours) that takes the architecture numbers as overrides where timm has no
# model of that exact shape (patch 4, the smoke model).
TIMM_BASE = "vit_tiny_patch16_224"


@dataclass(frozen=True)
class Arch:
    """A ViT encoder and its MAE decoder. Decoder defaults: MAE's 512 wide, 8 blocks, 16 heads.

    timm_name: the registered timm model with exactly this encoder, or None (then TIMM_BASE
    with the encoder numbers passed as keyword arguments).
    """
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    timm_name: Optional[str] = None

    def encoder_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments shared by models_mae.MAEEncoder and timm's VisionTransformer."""
        return dict(patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)

    def mae_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of models_mae.MaskedAutoencoderViT."""
        d = asdict(self)
        d.pop("timm_name")
        return d

    def timm_model(self) -> Tuple[str, Dict[str, Any]]:
        """(name, architecture kwargs) for timm.create_model building this encoder."""
        return (self.timm_name, {}) if self.timm_name else (TIMM_BASE, self.encoder_kwargs())

    def grid(self, img_size: int) -> int:
        """Patches per side at input side img_size; refuses a side the patch does not divide."""
        if img_size <= 0 or img_size % self.patch_size:
            raise UserError(f"input size {img_size} is not a positive multiple of the patch size "
                            f"{self.patch_size}")
        return img_size // self.patch_size


# name -> architecture. The report's model is vit_tiny_patch4 (DeiT-Tiny on 4x4 patches of 32x32
# images, 512x8 decoder); the smoke models (~0.3M parameters) run the pipeline in seconds on a CPU.
_SMOKE = dict(embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
ARCHS: Dict[str, Arch] = {
    "vit_smoke_patch4": Arch(patch_size=4, **_SMOKE),
    "vit_smoke_patch16": Arch(patch_size=16, **_SMOKE),
    "vit_tiny_patch4": Arch(patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "vit_tiny_patch16": Arch(16, 192, 12, 3, timm_name="vit_tiny_patch16_224"),
    "vit_small_patch16": Arch(16, 384, 12, 6, timm_name="vit_small_patch16_224"),
    "vit_base_patch16": Arch(16, 768, 12, 12, timm_name="vit_base_patch16_224"),
    "vit_large_patch16": Arch(16, 1024, 24, 16, timm_name="vit_large_patch16_224"),
}
MAE_PREFIX = "mae_"  # models_mae name = MAE_PREFIX + encoder name


class ArchModels(Mapping):
    """{prefix + name: builder} over ARCHS, read at every access: a models_* MODELS registry.

    builder(**kwargs) = build(ARCHS[name], **kwargs).
    """

    def __init__(self, prefix: str, build: Callable[..., Any]):
        self.prefix, self.build = prefix, build

    def __getitem__(self, model_name: str) -> Callable[..., Any]:
        name = model_name[len(self.prefix):] if model_name.startswith(self.prefix) else None
        if name not in ARCHS:
            raise KeyError(model_name)
        return partial(self.build, ARCHS[name])

    def __iter__(self) -> Iterator[str]:
        return iter([self.prefix + name for name in ARCHS])

    def __len__(self) -> int:
        return len(ARCHS)
