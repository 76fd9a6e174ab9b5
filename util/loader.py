"""Training-set loaders with one interface: `set_epoch(e)`, `len()`, iterate (imgs, labels) on device.

The data order (and, for worker processes, their seeds) depends only on (seed, epoch), so a
run resumed at an epoch boundary sees exactly the batches an uninterrupted run would.
"""
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from util.datasets import ArrayDataset, seeded_generator


class TorchvisionLoader:
    """The classic path: per-image PIL transforms in DataLoader workers, then copied to device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, batch_size: int,
                 device: torch.device, seed: int = 0, num_workers: int = 4, shuffle: bool = True,
                 drop_last: bool = True):
        self.device, self.seed = device, seed
        self.generator = seeded_generator(seed, 0)
        dataset = ArrayDataset(images, labels, transform)
        sampler = RandomSampler(dataset, generator=self.generator) if shuffle else None
        # drop_last keeps every step the same shape (no recompiles, no tiny last batch).
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                 drop_last=drop_last, num_workers=num_workers,
                                 generator=self.generator, pin_memory=device.type == "cuda")

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(seeded_generator(self.seed, epoch).initial_seed())

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for imgs, labels in self.loader:
            yield (imgs.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))
