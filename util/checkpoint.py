"""Checkpoints: plain dicts of tensors and Python scalars, loadable with weights_only=True.

Writes are atomic (temp file, fsync, rename), so a kill at any moment leaves either the
previous checkpoint or the new one, never a torn file.
"""
import os
import random
import re
import warnings
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch

from util.errors import UserError


def atomic_write(path: str, data) -> None:
    """Write `data` (bytes, or a function of a binary file) to `path` atomically and durably.

    A kill leaves the old file or the new one, never a torn one; a failed write (a full disk)
    removes its temporary file and is a one-line UserError. Temporary files of killed runs
    (`*.tmp<pid>`) are swept by util.rundir at the next start.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (ENOSPC) as a RuntimeError from its zip writer
        if isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(f"could not write {path} ({reason}); nothing older was lost")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, kind: Optional[str] = None,
                    require: tuple = ("model", "kind")) -> Dict[str, Any]:
    """Load on CPU; a missing, truncated or foreign file is a one-line UserError.

    kind: the "kind" entry expected ("pretrain", "finetune", ...), or None for any.
    require: the entries the caller reads; a file without one of them (a weights-only export,
    a bare state_dict) is refused, naming what is missing and what the file seems to be, rather
    than failing later with a KeyError.
    """
    ckpt = _torch_load(path)
    if kind is not None and isinstance(ckpt, dict) and "kind" in ckpt and ckpt["kind"] != kind:
        raise UserError(f"{path}: a {ckpt['kind']} checkpoint, expected a {kind} checkpoint")
    needed = tuple(require) + (("kind",) if kind is not None and "kind" not in require else ())
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing:
        return ckpt
    names = ", ".join(repr(k) for k in missing)
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (no {names}); it seems to be "
                        f"{_looks_like(ckpt)}")
    why = ("; resuming needs the full checkpoint a run writes (checkpoint-last.pth or checkpoint-N.pth)"
           if "optimizer" in missing else "")
    raise UserError(f"{path}: this {ckpt['kind']} checkpoint has no {names} (a weights-only export? it holds "
                    f"{', '.join(sorted(map(str, ckpt)))}){why}")


def _torch_load(path: str) -> Any:
    """torch.load with weights_only=True (nothing in the file can run code), errors as one line.

    torch's own message for a refused file advises weights_only=False, i.e. turning safe loading
    off; it is never passed on: the user is told what the file is instead.
    """
    if os.path.isdir(path):
        example = os.path.join(path, "checkpoint-last.pth")
        raise UserError(f"{path} is a folder; pass a checkpoint file (e.g. {example})")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(32)
        # judged before torch.load, which would also print warnings about a foreign pickle
        foreign = _foreign_format(head)
        if foreign is None:
            with warnings.catch_warnings():  # torch warns of an odd pickle protocol: the error says it all
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # permission denied, a read error: the file may be fine
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__})")
    except Exception as e:
        foreign = _unreadable_reason(path, head, e)
    raise UserError(f"{path}: not a readable checkpoint ({foreign})")


# torch.save's legacy (non-zip) format: a pickle whose first object is this magic number
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _foreign_format(head: bytes) -> Optional[str]:
    """Why a file starting with `head` (its first 32 bytes) is not a torch.save file, or None."""
    if not head:
        return "an empty file"
    if head.startswith(b"PK") or (head[0] == 0x80 and _LEGACY_MAGIC in head):  # zip (today's), legacy
        return None
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file, not a torch.save file"
    if len(head) > 8 and head[8:9] == b"{":
        return "a safetensors file, not a torch.save file"
    if head[0] == 0x80:  # every pickle of protocol 2 or later starts so
        return "a Python pickle, not a torch.save file"
    return "not a torch.save file: neither a zip archive nor a pickle"


def _unreadable_reason(path: str, head: bytes, error: Exception) -> str:
    """What a file that looked like a torch.save file but failed to load seems to be."""
    if head.startswith(b"PK"):  # torch.save's format is a zip archive holding */data.pkl
        if not zipfile.is_zipfile(path):
            return "a truncated or damaged zip archive: copy the file again"
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("/data.pkl") for n in z.namelist()):
                return "a zip archive, but not one written by torch.save"
    if isinstance(error, EOFError):
        return "the file ends early: truncated"
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:  # safe loading refused a class: torch's advice to turn it off is not passed on
        return (f"it holds objects other than tensors and plain values (e.g. {found.group(1)}), which "
                f"are not loaded because unpickling them could run code: not a checkpoint of this project")
    return f"a damaged torch.save file, or one in a format safe loading cannot read ({type(error).__name__})"


def _looks_like(obj: Any) -> str:
    """A short description of a loaded object that is not a checkpoint of this project."""
    def tensors(d):
        return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())
    if tensors(obj):
        return f"a bare state_dict of {len(obj)} tensor{'s' * (len(obj) > 1)} (weights only?)"
    if isinstance(obj, dict):
        keys = sorted(map(repr, obj))
        inner = next((f"; {k!r} is a state_dict of {len(v)} tensors (weights only?)"
                      for k, v in obj.items() if tensors(v)), "")
        return f"a dict with keys {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}{inner}"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


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
