"""Training-set loaders with one interface: `set_epoch(e)`, `len()`, iterate (imgs, labels) on device.

The data order (and, for worker processes, their seeds) depends only on (seed, epoch, rank),
so a run resumed at an epoch boundary sees exactly the batches an uninterrupted run would.
"""
from typing import Iterator, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dataio.augment import Augment
from dataio.in_memory import InMemoryLoader
from util.distributed import rank, world
from util.runtime import DATA, epoch_seed

DATA_LOADERS = ("in_memory", "torchvision")


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


class TorchvisionLoader:
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
                                 generator=self.generator, pin_memory=device.type == "cuda")

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(seeded_generator(self.seed, epoch, self.rank).initial_seed())

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for imgs, labels in self.loader:
            yield (imgs.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def build_train_loader(cfg, images: np.ndarray, labels: np.ndarray, device: torch.device, mean, std,
                       augment: Augment):
    """The training loader `cfg.data_loader` names, applying the `augment` recipe.

    in_memory does crop+flip+normalise as batched tensor ops on the device; torchvision runs
    the same recipe per image in worker processes (the classic path).
    """
    if cfg.data_loader == "in_memory":
        return InMemoryLoader(images, labels, cfg.batch_size, device, cfg.seed, mean=mean, std=std,
                              rank=rank(), world_size=world(), **augment.in_memory())
    return TorchvisionLoader(images, labels, augment.torchvision(images.shape[1], mean, std), cfg.batch_size,
                             device, cfg.seed, cfg.num_workers, rank=rank(), world_size=world())


class EvalLoader:
    """Unaugmented, in-order batches: uint8 images moved to the device once, normalised per batch.

    Used for test-set evaluation, feature extraction and kNN; no workers, no PIL.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device, mean, std):
        self.images = torch.from_numpy(images).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(labels).to(device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            x = self.images[i:i + self.batch_size].permute(0, 3, 1, 2).float()
            yield (x - self.mean) / self.std, self.labels[i:i + self.batch_size]


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
