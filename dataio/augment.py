"""Augmentation recipes, each written once.

`Augment` is the spec of the crop + flip recipes (pretraining, linear probing, none) from which
either training loader is built: the in-memory loader's batched tensor ops or torchvision's
per-image PIL pipeline; `eval_transform` is MAE's evaluation of an image file of any size.
Fine-tuning's RandAugment + random erasing is timm's pipeline (torchvision loader only), with
one repair: timm's "increasing" posterize maps the top magnitude (10, reached often with mstd
0.5) to 0 bits, which Pillow >= 13 rejects with a ValueError mid-epoch; we keep at least 1 bit
(almost black, as 0 bits meant).
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from PIL import ImageOps
from timm.data import auto_augment, create_transform
from torchvision import transforms

# Crop resampling. "bilinear_uint8" rounds the resampled image back to uint8 (clamped), as
# resampling the uint8 image itself does (PIL, or a loop that augments before normalising);
# the other two keep the resampled values in float. PIL (the torchvision loader) always rounds.
INTERPOLATIONS = ("bicubic", "bilinear", "bilinear_uint8")


@dataclass(frozen=True)
class Augment:
    """RandomResizedCrop(scale, ratio) back to the image size + horizontal flip, then normalise.

    scale: crop area range as a fraction of the image; None: no crop.
    """
    scale: Optional[Tuple[float, float]] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    interpolation: str = "bicubic"

    def torchvision(self, img_size: int, mean, std, fit: Sequence = ()) -> transforms.Compose:
        """The per-image PIL pipeline (DataLoader workers): PIL image -> (C, img_size, img_size).

        fit: the steps that bring an image to img_size x img_size when there is no random crop
        (`center_fit` for files of any size); none when the images already have that size.
        """
        steps = list(fit)  # the random crop below takes an image of any size to img_size
        if self.scale is not None:
            steps = [transforms.RandomResizedCrop(
                img_size, scale=self.scale, ratio=self.ratio,
                interpolation=transforms.InterpolationMode(self.interpolation.removesuffix("_uint8")))]
        if self.flip:
            steps.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])

    def in_memory(self) -> Dict[str, Any]:
        """Keyword arguments of dataio.in_memory.InMemoryLoader (batched on the device)."""
        return {"crop": self.scale is not None, "scale": self.scale or (1.0, 1.0), "ratio": self.ratio,
                "flip": self.flip, "interpolation": self.interpolation}


PRETRAIN = Augment(scale=(0.2, 1.0))  # MAE's pretraining crop
PROBE = Augment(scale=(0.08, 1.0))    # MAE's linear probe: RandomResizedCrop's default scale
NO_AUGMENT = Augment(scale=None, flip=False)
EVAL_CROP = 0.875  # MAE's evaluation crop: the central 224 pixels of an image resized to 256


def center_fit(img_size: int) -> list:
    """An image of any size -> img_size x img_size as MAE evaluates: the shorter side resized to
    int(img_size / 0.875) (bicubic), then the central img_size x img_size."""
    return [transforms.Resize(int(img_size / EVAL_CROP), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size)]


def eval_transform(img_size: int, mean, std) -> transforms.Compose:
    """Test set, kNN and feature extraction on image files: PIL image -> (C, img_size, img_size)."""
    return NO_AUGMENT.torchvision(img_size, mean, std, fit=center_fit(img_size))


def _posterize(img, bits_to_keep, **__):
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def finetune_transform(cfg, img_size: int, mean, std):
    """RandomResizedCrop + flip + RandAugment (cfg.aa) + normalise + random erasing (cfg.reprob)."""
    return create_transform(input_size=img_size, is_training=True, auto_augment=cfg.aa or None,
                            interpolation="bicubic", re_prob=cfg.reprob, re_mode=cfg.remode,
                            re_count=1, mean=mean, std=std)
