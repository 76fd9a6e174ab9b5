"""Training-set loaders with one interface: `set_epoch(e)`, `len()`, iterate (imgs, labels) on device.

The data order (and, for worker processes, their seeds) depends only on (seed, epoch), so a
run resumed at an epoch boundary sees exactly the batches an uninterrupted run would.
"""
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dataio.datasets import ArrayDataset, seeded_generator


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch))


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
        self.device, self.seed = device, seed
        self.sampler = PermutationSampler(len(images), seed, rank, world_size) if shuffle else None
        # Worker processes draw their augmentation seeds from this generator, reseeded per epoch.
        self.generator = seeded_generator(seed, 0)
        # drop_last keeps every step the same shape (no recompiles, no tiny last batch).
        self.loader = DataLoader(ArrayDataset(images, labels, transform), batch_size=batch_size,
                                 sampler=self.sampler, drop_last=drop_last, num_workers=num_workers,
                                 generator=self.generator, pin_memory=device.type == "cuda")

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(seeded_generator(self.seed, epoch).initial_seed())

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for imgs, labels in self.loader:
            yield (imgs.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def build_train_loader(cfg, images: np.ndarray, labels: np.ndarray, device: torch.device, mean, std,
                       scale=(0.2, 1.0), augment: bool = True, transform=None):
    """The training loader `cfg.data_loader` names: RandomResizedCrop(scale) + flip when `augment`.

    in_memory does crop+flip+normalise as batched tensor ops on the device; torchvision runs
    `transform` per image in worker processes (the classic path).
    """
    from util.distributed import rank, world
    if cfg.data_loader == "in_memory":
        from dataio.in_memory import InMemoryLoader
        return InMemoryLoader(images, labels, cfg.batch_size, device, cfg.seed, mean=mean, std=std,
                              crop=augment, flip=augment, scale=scale, rank=rank(), world_size=world())
    return TorchvisionLoader(images, labels, transform, cfg.batch_size, device, cfg.seed, cfg.num_workers,
                             rank=rank(), world_size=world())


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
