"""An in-memory training loader that augments whole batches on the device (cf. cifar10-airbench).

The uint8 dataset is moved to the device once; each batch is a slice of an on-device
permutation, cropped, resized, flipped and normalised in a handful of tensor ops. It has the
interface of `dataio.loader.TorchvisionLoader` (`set_epoch`, `len`, iterate (imgs, labels)).

Every random draw (order, crop boxes, flips) comes from a device generator seeded from
(seed, epoch) only: an epoch is reproducible in isolation (exact resume) and the global RNG,
which the model uses for masking, is left untouched.
"""
import math
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from dataio.augment import INTERPOLATIONS
from dataio.datasets import CIFAR10_MEAN, CIFAR10_STD
from util.runtime import DATA, epoch_seed

Boxes = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # top, left, h, w


def sample_boxes(n: int, H: int, W: int, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator, tries: int = 10) -> Boxes:
    """`n` boxes distributed as `transforms.RandomResizedCrop.get_params` on an HxW image.

    Returns (top, left, h, w), each an int64 tensor of shape (n,) on the generator's device.
    torchvision tries up to 10 (area, ratio) draws per image and keeps the first that fits;
    here all tries are drawn at once, (n, tries), and the first valid one is picked per row.
    """
    dev = generator.device
    u = torch.rand(n, 2, tries, device=dev, generator=generator)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 1])
    # torch.round, like Python's round, rounds half to even.
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    valid = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = valid.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # No valid try: torchvision's fallback, a central crop with the ratio clamped into range.
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(H * max(ratio))), H
    else:
        fw, fh = W, H
    ok = valid.any(dim=1)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    # Uniform integers in [0, H - h] and [0, W - w] (per-row bounds, so not torch.randint);
    # the clamp guards the rand() == 1 - eps edge against float rounding.
    t = torch.rand(n, 2, device=dev, generator=generator)
    top = torch.minimum((t[:, 0] * (H - h + 1)).long(), H - h)
    left = torch.minimum((t[:, 1] * (W - w + 1)).long(), W - w)
    top, left = torch.where(ok, top, (H - fh) // 2), torch.where(ok, left, (W - fw) // 2)
    return top, left, h, w


def _kernel(d: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Interpolation weight at distance d: PyTorch's bicubic (A = -0.75) or the linear hat."""
    d = d.abs()
    if interpolation.startswith("bilinear"):
        return (1 - d).clamp_(min=0)
    # The two cubic pieces are 0 at d = 1 and the outer one is 0 at d = 2, so clamping d into
    # each piece's range replaces masks (torch.where is slow on CPU).
    A = -0.75
    near = d.clamp(max=1)
    far = d.clamp(1, 2)
    return (((A + 2) * near - (A + 3)) * near * near + 1) + ((((A * far - 5 * A) * far + 8 * A)
                                                            * far) - 4 * A)


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                     flip: Optional[torch.Tensor], interpolation: str) -> torch.Tensor:
    """(B, out_size, in_size) weights resampling [start, start + length) of an axis to out_size.

    Output pixel o reads input coordinate start + (o + 0.5) * length / out_size - 0.5, the
    half-pixel-centre mapping of resized_crop / interpolate(align_corners=False). Taps past the
    image edge read the edge pixel (grid_sample's padding_mode='border').
    """
    dev = start.device
    pos = (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5) / out_size
    pos = pos.expand(len(start), out_size)
    if flip is not None:
        pos = torch.where(flip[:, None], 1 - pos, pos)  # mirror about the box centre
    src = start[:, None].float() + pos * length[:, None].float() - 0.5  # (B, out)
    # Only 4 taps per output pixel are non-zero (2 for bilinear): weigh those, then scatter
    # them into the dense matrix; clamped indices pile off-image taps onto the edge pixel.
    taps = src.floor()[:, :, None] + torch.arange(-1, 3, device=dev, dtype=torch.float32)
    weights = _kernel(src[:, :, None] - taps, interpolation)  # (B, out, 4)
    index = taps.long().clamp_(0, in_size - 1)
    dense = torch.zeros(len(start), out_size, in_size, device=dev, dtype=torch.float32)
    # One tap at a time: each call adds at most one value per element, so the sum order is
    # fixed and CUDA's atomic scatter_add_ stays deterministic (exact resume).
    for k in range(4):
        dense.scatter_add_(2, index[:, :, k:k + 1], weights[:, :, k:k + 1])
    return dense


def crop_resize(images: torch.Tensor, boxes: Optional[Boxes], flip_mask: Optional[torch.Tensor],
                out_size: Tuple[int, int], mean: torch.Tensor, std: torch.Tensor,
                interpolation: str = "bicubic") -> torch.Tensor:
    """Crop each image to its box, resize to `out_size`, flip where asked, normalise.

    images: (B, C, H, W) uint8; boxes: (top, left, h, w) int tensors of shape (B,), or None for
    the whole image without resampling; flip_mask: (B,) bool or None; mean, std: (C,) in the
    0-1 scale. Returns (B, C, *out_size) float32.

    The crop boxes are axis-aligned, so the resampling is separable: two batched matmuls with
    per-image (out, in) weight matrices, columns then rows. This computes what
    `F.grid_sample(mode=interpolation, padding_mode='border', align_corners=False)` on the
    box's `F.affine_grid` would (the flip folded in as a negated x scale), but without bicubic
    grid_sample's CPU cost (it made the whole loader 2-3x slower). Inside the box it equals
    `torchvision.transforms.functional.resized_crop(..., antialias=False)`; at the box edges
    torchvision replicates the crop's border where this reads the neighbouring image pixels.
    No antialiasing, which is exact for RandomResizedCrop back to the image size (boxes are
    only ever upsampled). If TF32 matmuls are enabled they round to ~1e-3 relative.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    B, C, H, W = images.shape
    x = images.contiguous().float()  # the bmm views below need NCHW-contiguous
    if boxes is None and (H, W) == tuple(out_size):
        if flip_mask is not None:
            x = torch.where(flip_mask.view(B, 1, 1, 1), x.flip(3), x)
    else:
        if boxes is None:
            zero = torch.zeros(B, dtype=torch.long, device=x.device)
            boxes = (zero, zero, zero + H, zero + W)
        top, left, h, w = boxes
        rows = _resample_matrix(top, h, H, out_size[0], None, interpolation)  # (B, Ho, H)
        cols = _resample_matrix(left, w, W, out_size[1], flip_mask, interpolation)  # (B, Wo, W)
        x = torch.bmm(x.view(B, C * H, W), cols.transpose(1, 2))  # (B, C * H, Wo)
        rows = rows[:, None].expand(B, C, *rows.shape[1:]).reshape(B * C, *rows.shape[1:])
        x = torch.bmm(rows, x.view(B * C, H, -1)).view(B, C, *out_size)
        # Bicubic overshoots; the PIL pipeline's uint8 output is clamped to 0..255, so clamp too.
        x = x.clamp_(0, 255)
        if interpolation == "bilinear_uint8":  # back to uint8 values, as resampling a uint8 image does
            x = x.round_()
    mean = mean.to(x.device, x.dtype).view(1, C, 1, 1)
    std = std.to(x.device, x.dtype).view(1, C, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


class InMemoryLoader:
    """Shuffled, augmented mini-batches of a uint8 dataset held on `device`.

    images (N, H, W, C) uint8, labels (N,) int64. Yields (imgs (B, C, S, S) float32 normalised,
    labels (B,) int64), both on `device`; S = out_size, at least the images' side (crops are only
    enlarged; default: H = W). Augmentation: RandomResizedCrop(scale, ratio) to S x S with
    `interpolation` ('bicubic' as in MAE, 'bilinear', or 'bilinear_uint8': rounded to uint8), then
    a horizontal flip with probability 1/2. With world_size > 1 each rank takes the shard
    perm[rank::world_size] of the same epoch permutation, trimmed (drop_last) or wrapped (not
    drop_last) to equal length, as DistributedSampler does.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device, seed: int = 0,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 crop: bool = True, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                 shuffle: bool = True, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1, interpolation: str = "bicubic", out_size: Optional[int] = None):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be in {INTERPOLATIONS}, not {interpolation!r}")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), not {images.dtype} "
                             f"{images.shape}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if out_size is not None and out_size < max(images.shape[1:3]):  # crop_resize has no antialiasing
            raise ValueError(f"out_size {out_size} is smaller than the images ({images.shape[1]}x{images.shape[2]})")
        self.device = torch.device(device)
        # NCHW once, so a batch is a plain gather with no per-step transpose.
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.images = self.images.permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.crop, self.scale, self.ratio, self.flip = crop, tuple(scale), tuple(ratio), flip
        self.shuffle, self.drop_last, self.interpolation = shuffle, drop_last, interpolation
        self.rank, self.world_size = rank, world_size
        self.out_size = tuple(self.images.shape[2:]) if out_size is None else (out_size, out_size)
        n = len(self.images)
        # Per-rank sample count, equal across ranks (DistributedSampler's rule).
        self.per_rank = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        b = self.batch_size
        return self.per_rank // b if self.drop_last else -(-self.per_rank // b)

    def _generator(self) -> torch.Generator:
        # The data stream of (seed, epoch), as every loader's, on the device.
        return torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.epoch, stream=DATA))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        gen = self._generator()
        n, (H, W) = len(self.images), self.images.shape[2:]
        perm = (torch.randperm(n, device=self.device, generator=gen) if self.shuffle
                else torch.arange(n, device=self.device))
        total = self.per_rank * self.world_size
        if total > n:  # not drop_last: pad by wrapping around, so every rank has per_rank
            perm = perm.repeat(-(-total // n))
        shard = perm[:total][self.rank::self.world_size]
        for i in range(len(self)):
            idx = shard[i * self.batch_size:(i + 1) * self.batch_size]
            # Draw for the global batch (all ranks' images, interleaved as in the shards) and
            # keep this rank's rows: ranks get independent augmentations, and together they see
            # exactly what one process with batch_size * world_size would.
            G, r, ws = len(idx) * self.world_size, self.rank, self.world_size
            boxes = flips = None
            if self.crop:
                boxes = tuple(b[r::ws] for b in sample_boxes(G, H, W, self.scale, self.ratio, gen))
            if self.flip:
                flips = (torch.rand(G, device=self.device, generator=gen) < 0.5)[r::ws]
            # index_select: a plain gather, ~10x faster than advanced indexing on CPU.
            x = crop_resize(self.images.index_select(0, idx), boxes, flips, self.out_size, self.mean,
                            self.std, self.interpolation)
            yield x, self.labels.index_select(0, idx)
