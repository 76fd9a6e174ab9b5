"""dataio/in_memory.py: order and sharding, box distribution, pixel parity with torchvision."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from dataio.in_memory import InMemoryLoader, crop_resize, sample_boxes

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CPU = torch.device("cpu")
MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def random_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def smooth_image(seed: int = 0) -> torch.Tensor:
    """(3, 32, 32) float in 0..255, natural-image-like smoothness (8x8 noise upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g) * 255
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False)[0].round()


def make_loader(n=64, batch_size=8, **kw) -> InMemoryLoader:
    return InMemoryLoader(random_images(n), np.arange(n, dtype=np.int64), batch_size, CPU,
                          mean=MEAN, std=STD, **kw)


def epoch(loader: InMemoryLoader, e: int):
    loader.set_epoch(e)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_each_image_once_per_epoch_reshuffled_and_reproducible():
    loader = make_loader(seed=3)
    assert len(loader) == 8
    x0, ids0 = epoch(loader, 0)
    x1, ids1 = epoch(loader, 1)
    for ids in (ids0, ids1):
        assert ids.dtype == torch.int64 and ids.sort().values.tolist() == list(range(64))
    assert ids0.tolist() != ids1.tolist()
    # A fresh loader jumping straight to epoch 1 (a resume) sees the same order and pixels.
    xr, idsr = epoch(make_loader(seed=3), 1)
    assert idsr.tolist() == ids1.tolist() and torch.equal(xr, x1)
    assert epoch(make_loader(seed=4), 1)[1].tolist() != ids1.tolist()


@pytest.mark.parametrize("n,drop_last,length,last", [(64, True, 4, 8), (70, True, 4, 8),
                                                     (70, False, 5, 3)])
def test_ranks_take_disjoint_equal_shards(n, drop_last, length, last):
    shards = []
    for rank in range(2):
        loader = make_loader(n, rank=rank, world_size=2, drop_last=drop_last, seed=1)
        assert len(loader) == length
        loader.set_epoch(2)
        sizes = [len(y) for _, y in loader]
        assert sizes == [8] * (length - 1) + [last]
        shards.append(epoch(loader, 2)[1].tolist())
    if drop_last:
        assert not set(shards[0]) & set(shards[1])
        assert len(set(shards[0]) | set(shards[1])) == 8 * 2 * length
        if n == 64:
            assert sorted(shards[0] + shards[1]) == list(range(64))
    else:  # padded by wrapping, as DistributedSampler: everything seen, 70 -> 2 * 35
        assert set(shards[0]) | set(shards[1]) == set(range(n))


def test_ranks_together_equal_one_process_with_the_global_batch():
    one = make_loader(64, batch_size=16, seed=5)
    one.set_epoch(1)
    ranks = [make_loader(64, batch_size=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def test_box_distribution_matches_torchvision():
    n, scale, ratio = 20000, (0.2, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = sample_boxes(n, 32, 32, scale, ratio, torch.Generator().manual_seed(0))
    assert ((h > 0) & (w > 0) & (top >= 0) & (left >= 0)).all()
    assert ((top + h <= 32) & (left + w <= 32)).all()
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio))
                        for _ in range(n)]).T
    ours = {"area": h * w / 1024, "ratio": w / h, "top": top, "left": left}
    theirs = {"area": ref[2] * ref[3] / 1024, "ratio": ref[3] / ref[2], "top": ref[0],
              "left": ref[1]}
    # Tolerances are ~4 standard errors at n = 20000 (area std 0.21, ratio 0.16, top 4.0).
    tol = {"area": 0.01, "ratio": 0.008, "top": 0.16, "left": 0.16}
    for k in ours:
        a, b = ours[k].double(), theirs[k].double()
        assert abs(a.mean() - b.mean()) < tol[k], k
        assert abs(a.std() / b.std() - 1) < 0.03, k
        # KS critical value at alpha = 0.001 for two samples of 20000 is 0.0195.
        assert ks_statistic(a, b) < 0.02, k


@pytest.mark.parametrize("scale,ratio", [((2.0, 3.0), (3 / 4, 4 / 3)), ((2.0, 3.0), (2.0, 3.0)),
                                         ((2.0, 3.0), (0.25, 0.5))])
def test_box_fallback_matches_torchvision(scale, ratio):
    # Areas beyond the image never fit: every box is torchvision's central fallback crop.
    boxes = torch.stack(sample_boxes(5, 32, 32, scale, ratio, torch.Generator().manual_seed(0)))
    ref = RandomResizedCrop.get_params(torch.zeros(3, 32, 32), list(scale), list(ratio))
    assert boxes.T.tolist() == [list(ref)] * 5


def box_tensors(*box):
    return tuple(torch.tensor([v]) for v in box)


IDENTITY = (torch.zeros(3), torch.full((3,), 1 / 255))  # mean, std that leave 0..255 values


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("box", [(0, 0, 32, 32), (3, 5, 20, 25), (10, 10, 8, 8), (0, 0, 14, 18),
                                 (20, 17, 12, 15), (0, 6, 32, 20)])
def test_crop_resize_matches_torchvision_resized_crop(mode, box):
    img = smooth_image(sum(box))
    ref = TF.resized_crop(img, *box, [32, 32], interpolation=MODES[mode], antialias=False)
    out = crop_resize(img[None].to(torch.uint8), box_tensors(*box), None, (32, 32), *IDENTITY,
                      interpolation=mode)[0]
    diff = (out - ref.clamp(0, 255)).abs()
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    if box == (0, 0, 32, 32):
        assert diff.max() < 1e-3
    assert diff.mean() < 0.01 * 255
    # Where every interpolation tap falls inside the box, the two agree exactly: the mapping is
    # right and only torchvision's border replication at the box edges differs.
    top, left, h, w = box
    reach = 2 if mode == "bicubic" else 1
    def inside(size: int) -> torch.Tensor:
        s = (torch.arange(32) + 0.5) * size / 32 - 0.5
        return (s.floor() - (reach - 1) >= 0) & (s.floor() + reach <= size - 1)
    mask = inside(h)[:, None] & inside(w)[None, :]
    assert mask.any()
    assert diff[:, mask].max() < 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_crop_resize_equals_affine_grid_sample(mode):
    # The separable matmuls compute grid_sample on the box's affine grid, flip = negated x scale.
    imgs = torch.from_numpy(random_images(6, seed=3)).permute(0, 3, 1, 2).contiguous()
    top, left = torch.tensor([0, 0, 5, 20, 31, 2]), torch.tensor([0, 3, 0, 14, 30, 29])
    h, w = torch.tensor([32, 29, 9, 12, 1, 17]), torch.tensor([32, 20, 31, 18, 2, 3])
    flips = torch.tensor([False, True, True, False, True, False])
    out = crop_resize(imgs, (top, left, h, w), flips, (32, 32), *IDENTITY, interpolation=mode)
    sx = torch.where(flips, -w / 32, w / 32)
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / 32 - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / 32, (2 * top + h) / 32 - 1
    grid = F.affine_grid(theta, [6, 3, 32, 32], align_corners=False)
    ref = F.grid_sample(imgs.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    assert (out - ref.clamp(0, 255)).abs().max() < 0.05  # of 0..255; float rounding only


@pytest.mark.parametrize("mode", MODES)
def test_flip(mode):
    imgs = torch.from_numpy(random_images(4)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    flips = torch.ones(4, dtype=torch.bool)
    expect = ((imgs.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)).flip(3)
    # No box: no resampling, an exact flip.
    assert torch.allclose(crop_resize(imgs, None, flips, (32, 32), mean, std, mode), expect,
                          atol=1e-6)
    # The full box through the sampler, with the flip folded into the affine map.
    full = tuple(torch.tensor([0, 0, 32, 32]).repeat(4, 1).T)
    out = crop_resize(imgs, full, flips, (32, 32), mean, std, mode)
    assert (out - expect).abs().max() < 1e-3
    # Any box: flipped output is the mirror image of the unflipped one.
    box = (torch.tensor([1, 4, 0, 9]), torch.tensor([2, 0, 7, 3]), torch.tensor([20, 9, 31, 12]),
           torch.tensor([17, 30, 11, 25]))
    mixed = torch.tensor([True, False, True, False])
    plain = crop_resize(imgs, box, None, (32, 32), mean, std, mode)
    out = crop_resize(imgs, box, mixed, (32, 32), mean, std, mode)
    assert torch.allclose(out, torch.where(mixed.view(4, 1, 1, 1), plain.flip(3), plain),
                          atol=1e-4)


def test_no_augmentation_is_exact_normalisation_in_permuted_order():
    images = random_images(32, seed=7)
    loader = InMemoryLoader(images, np.arange(32, dtype=np.int64), 8, CPU, seed=2, mean=MEAN,
                            std=STD, crop=False, flip=False)
    x, ids = epoch(loader, 0)
    assert x.dtype == torch.float32 and x.shape == (32, 3, 32, 32) and x.device == CPU
    assert ids.tolist() != list(range(32))
    ref = torch.from_numpy(images).permute(0, 3, 1, 2).float()[ids]
    ref = (ref / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert (x - ref).abs().max() < 1e-6


def test_augmentations_vary_and_stay_in_range():
    loader = make_loader(seed=0)
    x, _ = epoch(loader, 0)
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (x >= lo.view(3, 1, 1) - 1e-5).all() and (x <= hi.view(3, 1, 1) + 1e-5).all()
    # Most images are actually cropped/flipped (the identity crop with no flip is rare).
    plain = epoch(make_loader(seed=0, crop=False, flip=False), 0)[0]
    changed = ((x - plain).abs().flatten(1).amax(1) > 1e-3).float().mean()
    assert changed > 0.8


def test_global_rng_untouched():
    loader = make_loader(seed=0)
    state = torch.get_rng_state()
    epoch(loader, 0)
    assert torch.equal(state, torch.get_rng_state())


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_loader(interpolation="nearest")
    with pytest.raises(ValueError):
        make_loader(rank=2, world_size=2)
    with pytest.raises(ValueError):
        InMemoryLoader(random_images(4).astype(np.float32), np.arange(4), 2, CPU)
