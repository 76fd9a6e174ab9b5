"""Device selection and seeding."""
import contextlib
import random

import numpy as np

import torch

from util.errors import UserError


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


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed the global RNGs from (seed, epoch, rank): epochs are reproducible alone.

    torch drives masks and drop path; Python's and NumPy's RNGs drive timm's and torchvision's
    per-image augmentations when they run in the main process (num_workers=0).
    """
    s = (seed * 1_000_003 + epoch) * 997 + rank
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
