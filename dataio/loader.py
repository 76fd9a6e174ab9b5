"""Loaders with one interface: `set_epoch(e)`, `len()`, iterate (imgs, labels) on the device.

`build_train_loader` and `build_eval_loader` are the one place that picks a loader from the
run's config and what `dataio.datasets.load_split` read (a uint8 array or ImageFiles):

    uint8 array, in_memory   -> InMemoryLoader (batched crop/flip on the device) / EvalLoader
    uint8 array, torchvision -> TorchvisionLoader (per-image PIL transforms in workers) / EvalLoader
    ImageFiles (any loader)  -> FileLoader (files decoded per step in persistent workers)

The data order (and the augmentations' random draws) depend only on (seed, epoch, rank), so a
run resumed at an epoch boundary sees exactly the batches an uninterrupted run would.
"""
import itertools
import random
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision import transforms

from dataio.augment import Augment, center_fit, eval_transform
from dataio.datasets import ImageFiles, open_rgb
from dataio.in_memory import InMemoryLoader, crop_resize
from util.distributed import rank, world
from util.errors import UserError
from util.runtime import DATA, epoch_seed
from util.signals import worker_ignores_stops

DATA_LOADERS = ("in_memory", "torchvision")
PREFETCH = 4  # batches each FileLoader worker decodes ahead: slow JPEGs do not stall a step


def seeded_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The data stream of (seed, epoch, rank) as a CPU generator."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank, stream=DATA))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`, the same on every rank: a function of (seed, epoch)."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch))


class ArrayDataset(Dataset):
    """uint8 images (N, H, W, C) + labels through a per-image PIL transform (the classic path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)  # grayscale: mode "L"
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


class PermutationSampler(Sampler):
    """Yields this rank's shard perm[rank::world_size] of `epoch_permutation(n, seed, epoch)`."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch)[:len(self) * self.world_size]
        return iter(perm[self.rank::self.world_size].tolist())


class _ToDevice:
    """Iterates `self.loader` (a DataLoader), moving each batch to `self.device`."""
    loader: DataLoader
    device: torch.device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for imgs, labels in self.loader:
            yield (imgs.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


class TorchvisionLoader(_ToDevice):
    """The classic path: per-image PIL transforms in DataLoader workers, then copied to device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, batch_size: int,
                 device: torch.device, seed: int = 0, num_workers: int = 4, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        self.device, self.seed, self.rank = device, seed, rank
        self.sampler = PermutationSampler(len(images), seed, rank, world_size) if shuffle else None
        # Worker processes draw their augmentation seeds from this generator, reseeded per epoch
        # and per rank (each rank's images get their own augmentation draws).
        self.generator = seeded_generator(seed, 0, rank)
        # drop_last keeps every step the same shape (no recompiles, no tiny last batch).
        self.loader = DataLoader(ArrayDataset(images, labels, transform), batch_size=batch_size,
                                 sampler=self.sampler, drop_last=drop_last, num_workers=num_workers,
                                 generator=self.generator, pin_memory=device.type == "cuda",
                                 worker_init_fn=worker_ignores_stops)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(seeded_generator(self.seed, epoch, self.rank).initial_seed())


class SeededItems(PermutationSampler):
    """Yields (index, seed): this rank's shard of the epoch's order (PermutationSampler's), or
    every index in order (shuffle=False, evaluation, one rank), each with the seed of that
    image's augmentation, drawn from the data stream of (seed, epoch, rank).

    The seeds travel with the indices into the workers, so an image's augmentation depends on
    neither which worker reads it nor what that worker read before: persistent workers keep
    their RNG across epochs, and the batches before a resume point need not be read at all.
    `start` skips that many positions of the epoch (a resume).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        super().__init__(n, seed, rank, world_size)
        self.shuffle, self.start = shuffle, 0

    def __iter__(self):
        order = super().__iter__() if self.shuffle else iter(range(self.n))
        seeds = torch.randint(2**62, (len(self),), generator=seeded_generator(self.seed, self.epoch, self.rank))
        return itertools.islice(zip(order, seeds.tolist()), self.start, None)


class FileDataset(Dataset):
    """ImageFiles + labels: item (index, seed) -> (transform(RGB image), label)."""

    def __init__(self, files: ImageFiles, labels: np.ndarray, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        img = open_rgb(self.files[index])
        # torchvision's transforms draw from torch's RNG, timm's RandAugment/erasing from Python's
        # and NumPy's. In a worker those are the worker's own; in the main process
        # (num_workers=0) they drive masking and drop path, so their state is put back.
        saved = None if get_worker_info() else (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.random.default_generator.manual_seed(seed)  # the CPU's only: CUDA's draws the masks
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.transform(img), int(self.labels[index])
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


class FileLoader(_ToDevice):
    """Image files decoded per step in persistent DataLoader workers at their own resolution,
    through a per-image transform to a common size; prefetched, pinned on CUDA.

    Yields (imgs (B, C, S, S) float32, labels (B,) int64) on `device`, S the transform's size.
    shuffle=False, drop_last=False, world_size=1: every image once, in order (evaluation).
    """

    def __init__(self, files: ImageFiles, labels: np.ndarray, transform, batch_size: int,
                 device: torch.device, seed: int = 0, num_workers: int = 4, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        self.device, self.batch_size = device, batch_size
        self.sampler = SeededItems(len(files), seed, rank, world_size, shuffle)
        self.resume_epoch, self.resume_step, self.skip = None, 0, 0
        workers = {"persistent_workers": True, "prefetch_factor": PREFETCH} if num_workers else {}
        # The generator only seeds the workers' unused base seed: without it the DataLoader would
        # draw that from the global RNG, which masking uses.
        self.loader = DataLoader(FileDataset(files, labels, transform), batch_size=batch_size,
                                 sampler=self.sampler, drop_last=drop_last, num_workers=num_workers,
                                 generator=torch.Generator().manual_seed(seed),
                                 pin_memory=device.type == "cuda", worker_init_fn=worker_ignores_stops,
                                 **workers)

    def start_at(self, epoch: int, step: int) -> None:
        """The coming pass over `epoch` is a resume at batch `step`: its first `step` batches are
        placeholders (None), no file read. util.runtime.epoch_batches drops those batches unseen
        (as they were trained before the stop), and the per-image seeds make the rest exact."""
        self.resume_epoch, self.resume_step = epoch, step

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = self.resume_step if epoch == self.resume_epoch else 0
        self.resume_epoch = None  # a later pass over the same epoch reads everything
        self.sampler.start = self.skip * self.batch_size

    def __iter__(self) -> Iterator[Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        yield from itertools.repeat(None, self.skip)
        try:
            yield from super().__iter__()
        except UserError as e:  # an unreadable file. From a worker, the message holds the worker's
            # traceback: keep its last line (the file and the cause), as the main process says it
            last = str(e).strip().splitlines()[-1]
            raise UserError(last.removeprefix(f"{UserError.__module__}.UserError: ")) from None


def build_train_loader(cfg, images: Union[np.ndarray, ImageFiles], labels: np.ndarray, device: torch.device,
                       mean, std, augment, resume: Optional[dict] = None):
    """The training loader for `images` (`load_split`) and cfg.data_loader, at cfg.input_size.

    augment: an `Augment` recipe, or a per-image transform (fine-tuning's timm pipeline,
    torchvision loaders only). in_memory runs the recipe as batched tensor ops on the device;
    torchvision per image in worker processes (the classic path); image files are always
    decoded per image. resume: the checkpoint this run continues (a FileLoader skips the
    batches of its epoch trained before the stop without reading them).
    """
    size = cfg.input_size
    common = dict(batch_size=cfg.batch_size, device=device, seed=cfg.seed, rank=rank(), world_size=world())
    if isinstance(images, ImageFiles):
        transform = augment.torchvision(size, mean, std, center_fit(size)) if isinstance(augment, Augment) else augment
        loader = FileLoader(images, labels, transform, num_workers=cfg.num_workers, **common)
        if resume is not None:
            loader.start_at(resume["epoch"], resume.get("epoch_step", 0))
        return loader
    if cfg.data_loader == "in_memory":
        return InMemoryLoader(images, labels, mean=mean, std=std, out_size=size, **common, **augment.in_memory())
    if isinstance(augment, Augment):  # without a crop, enlarge the whole image to the input size
        fit = [] if images.shape[1] == size else [transforms.Resize(size, transforms.InterpolationMode.BICUBIC)]
        augment = augment.torchvision(size, mean, std, fit)
    return TorchvisionLoader(images, labels, augment, num_workers=cfg.num_workers, **common)


def build_eval_loader(cfg, images: Union[np.ndarray, ImageFiles], labels: np.ndarray, device: torch.device,
                      mean, std):
    """Unaugmented batches in order, at cfg.input_size: test set, kNN, feature extraction.

    A uint8 array goes to the device once (EvalLoader); image files are decoded per batch in
    workers, MAE's evaluation transform (shorter side to input_size / 0.875, central crop).
    """
    if isinstance(images, ImageFiles):
        return FileLoader(images, labels, eval_transform(cfg.input_size, mean, std), cfg.batch_size, device,
                          num_workers=cfg.num_workers, shuffle=False, drop_last=False)
    return EvalLoader(images, labels, cfg.batch_size, device, mean, std, size=cfg.input_size)


class EvalLoader:
    """Unaugmented, in-order batches: uint8 images moved to the device once, normalised per batch.

    Used for test-set evaluation, feature extraction and kNN; no workers, no PIL. size: the
    side the model takes; images of another side are resampled whole to it (bicubic, as the
    in-memory training loader resamples its crops; enlarging only, so no antialiasing needed).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device, mean, std, size: Optional[int] = None):
        self.images = torch.from_numpy(images).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(labels).to(device)
        self.batch_size, self.size, self.norm = batch_size, size, (torch.tensor(mean), torch.tensor(std))
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            x = self.images[i:i + self.batch_size].permute(0, 3, 1, 2)
            if self.size is None or x.shape[2] == x.shape[3] == self.size:
                x = (x.float() - self.mean) / self.std
            else:
                x = crop_resize(x, None, None, (self.size, self.size), *self.norm)
            yield x, self.labels[i:i + self.batch_size]


class TensorLoader:
    """Shuffled mini-batches of in-memory tensors (cached features): same interface as above."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
                 drop_last: bool = True):
        self.x, self.y, self.batch_size, self.seed, self.drop_last = x, y, batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(len(self.x), self.seed, self.epoch).to(self.x.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]
