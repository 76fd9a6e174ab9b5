"""Fine-tuning augmentation: timm's RandAugment + random erasing pipeline, with one repair.

timm's "increasing" posterize maps the top magnitude (10, reached often with mstd 0.5) to
0 bits, which Pillow >= 13 rejects with a ValueError mid-epoch. We keep at least 1 bit
(the nearest valid image: almost black, as 0 bits meant) instead of crashing.
"""
from PIL import ImageOps
from timm.data import auto_augment, create_transform


def _posterize(img, bits_to_keep, **__):
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def finetune_transform(cfg, img_size: int, mean, std):
    """RandomResizedCrop + flip + RandAugment (cfg.aa) + normalise + random erasing (cfg.reprob)."""
    return create_transform(input_size=img_size, is_training=True, auto_augment=cfg.aa or None,
                            interpolation="bicubic", re_prob=cfg.reprob, re_mode=cfg.remode,
                            re_count=1, mean=mean, std=std)
