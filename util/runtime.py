"""Device selection, seeding, and the epoch iterator shared by the training loops."""
import contextlib
import random
import shutil
import sys
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from util.checkpoint import set_rng_state
from util.errors import UserError

# --precision: auto = bf16 autocast where the device runs it fast, fp32 elsewhere.
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available (use --device cpu or auto)")
    return torch.device(name)


def fast_bf16(device: torch.device) -> bool:
    """Does this device run bf16 matmuls natively? CUDA: Ampere or newer; CPU: oneDNN reports
    bf16 support (AVX512-BF16 / AMX); without it bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device, resumed: Optional[str] = None) -> str:
    """auto -> bf16 or fp32 for this device; a resumed run keeps the precision it ran with
    (exact resume), whatever this machine would choose. Prints the resolved choice."""
    chosen = precision
    if precision == "auto":
        chosen = resumed if resumed in ("bf16", "fp32") else ("bf16" if fast_bf16(device) else "fp32")
    elif precision == "bf16" and not fast_bf16(device):
        print(f"note: --precision bf16 on a {device.type} without native bf16 runs emulated (slower than fp32)")
    print(f"precision: {chosen}" + (" (auto)" if precision == "auto" else ""))
    return chosen


def autocast(device: torch.device, precision: str):
    """bf16 autocast (CUDA and CPU): activations in bf16, weights and optimizer state in fp32,
    no GradScaler needed (bf16 has fp32's range)."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_module(fn, device: torch.device):
    """torch.compile (inductor) on CUDA and CPU. On CPU inductor generates C++ and needs a
    compiler: without one, say so now rather than fail at the first step."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++) for torch.compile's "
                        "inductor backend; install one (apt-get install g++) or drop --compile")
    return torch.compile(fn)


def speed_options(model: torch.nn.Module, cfg, device: torch.device):
    """Returns the callable to run forward passes with: `model`, or its torch.compile'd twin."""
    return compile_module(model, device) if cfg.compile else model


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (each new one is a (re)compile)."""
    from torch._dynamo.utils import counters  # private but stable across 2.x: dynamo's own tally
    return int(counters["stats"]["unique_graphs"])


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
