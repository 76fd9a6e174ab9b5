"""Checkpoints: plain dicts of tensors and Python scalars, loadable with weights_only=True.

Writes are atomic (temp file, fsync, rename), so a kill at any moment leaves either the
previous checkpoint or the new one, never a torn file.
"""
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from util.errors import UserError


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, kind: Optional[str] = None) -> Dict[str, Any]:
    """Load on CPU; a missing, truncated or foreign file is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint (truncated or foreign file: {msg[:200]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (no 'model'/'kind' entries)")
    if kind is not None and ckpt["kind"] != kind:
        raise UserError(f"{path}: a {ckpt['kind']} checkpoint, expected a {kind} checkpoint")
    return ckpt


def rng_state() -> Dict[str, Any]:
    """torch, CUDA, Python and NumPy RNG states, as tensors and plain tuples (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
