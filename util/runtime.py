"""Device selection, seeding, and the epoch iterator shared by the training loops."""
import contextlib
import random
import sys
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from util.checkpoint import set_rng_state
from util.errors import UserError

PRECISIONS = ("bf16", "fp32")  # --precision: bf16 autocast on CUDA, or fp32 throughout


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available (use --device cpu or auto)")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA: activations in bf16, weights and optimizer in fp32, no scaler needed."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def speed_options(model: torch.nn.Module, cfg, device: torch.device):
    """Returns the callable to run forward passes with: `model`, or its torch.compile'd twin.

    Prints what is ignored on this device instead of failing, so one config serves CPU and GPU.
    """
    if device.type != "cuda":
        ignored = [f for f, on in (("--precision bf16", cfg.precision == "bf16"), ("--compile", cfg.compile)) if on]
        if ignored:
            print(f"note: {' and '.join(ignored)} ignored on {device.type}: running fp32 eager")
        return model
    if cfg.compile:
        return torch.compile(model)
    return model


GLOBAL, DATA = 0, 1  # random streams: the global RNGs (masks, drop path) and the data's


def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = GLOBAL) -> int:
    """The one seed formula: every random draw of an epoch derives from (seed, epoch, rank,
    stream), so an epoch is reproducible alone (exact resume) and streams never coincide."""
    return ((seed * 1_000_003 + epoch) * 997 + rank) * 2 + stream


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed the global RNGs for an epoch. torch drives masks and drop path; Python's and
    NumPy's drive timm's and torchvision's per-image augmentations in the main process."""
    s = epoch_seed(seed, epoch, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def epoch_batches(loader, epoch: int, skip: int = 0, resume_rng: Optional[dict] = None
                  ) -> Tuple[tqdm, Iterator[Tuple[int, tuple]]]:
    """A progress bar over `loader` and an iterator of (step index, batch) from step `skip` on.

    Resuming mid-epoch, the first `skip` batches are drawn and dropped, so the loader's own
    generator advances exactly as in the interrupted run; the RNG states saved with that run's
    checkpoint (`resume_rng`) are restored right after batch skip-1 is drawn, before batch `skip`
    (with num_workers=0 its augmentation uses this RNG).
    """
    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=None, file=sys.stderr)

    def batches():
        for i, batch in enumerate(bar):
            if i < skip:
                if i == skip - 1 and resume_rng is not None:
                    set_rng_state(resume_rng)
                continue
            yield i, batch
    return bar, batches()
