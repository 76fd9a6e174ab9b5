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
                    require: tuple = ("model", "kind"), check_weights: bool = True) -> Dict[str, Any]:
    """Load on CPU; a missing, truncated, foreign or damaged file is a one-line UserError.

    kind: the "kind" entry expected ("pretrain", "finetune", ...), or None for any.
    require: the entries the caller reads; a file without one of them (a weights-only export,
    a bare state_dict) is refused, naming what is missing and what the file seems to be, rather
    than failing later with a KeyError.
    check_weights: refuse weights holding NaN or Inf (see _check_finite); off only for a caller
    that reads no weights (finding the newest run by its "kind").
    """
    ckpt = _torch_load(path)
    if kind is not None and isinstance(ckpt, dict) and "kind" in ckpt and ckpt["kind"] != kind:
        raise UserError(f"{path}: a {ckpt['kind']} checkpoint, expected a {kind} checkpoint")
    needed = tuple(require) + (("kind",) if kind is not None and "kind" not in require else ())
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing:
        _check_entries(path, ckpt)
        if isinstance(ckpt.get("config"), dict):
            _fill_old_defaults(ckpt["config"])
        if check_weights:
            _check_finite(path, ckpt)
        return ckpt
    names = ", ".join(repr(k) for k in missing)
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (no {names}); it seems to be "
                        f"{_looks_like(ckpt)}")
    why = ("; resuming needs the full checkpoint a run writes (checkpoint-last.pth or checkpoint-N.pth)"
           if "optimizer" in missing else "")
    raise UserError(f"{path}: this {ckpt['kind']} checkpoint has no {names} (a weights-only export? it holds "
                    f"{', '.join(sorted(map(str, ckpt)))}){why}")


# entries holding state_dicts (name -> tensor): the run's model and its target encoders (None
# before they exist)
STATE_ENTRIES = ("model", "target", "target_slow")
DAMAGED = "a damaged or hand-edited checkpoint"
# What an empty value meant in a config written before the config recorded it: (dataset, key) ->
# the default of that time. Runs before the report's CIFAR-10 std became the default
# (dataio.datasets.CIFAR10_STD) normalised with the data's true std.
RECORDED_SINCE = {("cifar10", "norm_std"): "0.247,0.2435,0.2616"}


def _fill_old_defaults(config: Dict[str, Any]) -> None:
    """Make an older run's config say what it ran with, in place (RECORDED_SINCE)."""
    for (dataset, key), value in RECORDED_SINCE.items():
        if config.get("dataset", "cifar10") == dataset and not config.get(key):
            config[key] = value


def _check_entries(path: str, ckpt: Dict[str, Any]) -> None:
    """Refuse entries of the wrong type here, in one line, rather than as a TypeError deep in a caller."""
    for key in STATE_ENTRIES:
        entry = ckpt.get(key)
        if entry is not None and not (isinstance(entry, dict) and
                                      all(isinstance(v, torch.Tensor) for v in entry.values())):
            raise UserError(f"{path}: its {key!r} is {_looks_like(entry)}, not a state_dict of tensors ({DAMAGED})")
    if "config" in ckpt and not (isinstance(ckpt["config"], dict) and isinstance(ckpt["config"].get("model"), str)):
        what = "names no 'model'" if isinstance(ckpt["config"], dict) else f"is {_looks_like(ckpt['config'])}"
        raise UserError(f"{path}: its 'config' {what}, where the settings of the run that wrote it belong ({DAMAGED})")
    for key in ("epoch", "step"):
        if key in ckpt and (not isinstance(ckpt[key], int) or isinstance(ckpt[key], bool) or ckpt[key] < 0):
            raise UserError(f"{path}: its {key!r} is {ckpt[key]!r}, not a count ({DAMAGED})")


def _weight_tensors(ckpt: Dict[str, Any]):
    """(entry, name, tensor) for every floating-point tensor of the weights and the optimizer's
    state (a NaN moment makes the weights NaN at the first step)."""
    for key in STATE_ENTRIES:
        for name, t in (ckpt.get(key) or {}).items():
            if t.is_floating_point():
                yield key, name, t
    opt = ckpt.get("optimizer")
    state = opt.get("state") if isinstance(opt, dict) else None
    for index, slots in (state.items() if isinstance(state, dict) else ()):
        for name, t in (slots.items() if isinstance(slots, dict) else ()):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                yield "optimizer", f"state.{index}.{name}", t


def non_finite(ckpt: Dict[str, Any]) -> Optional[str]:
    """Where a checkpoint's weights (or optimizer state) hold NaN or Inf, in words, or None. One
    isfinite pass per tensor and one host sync at the end; the culprit is named from the flags,
    with no second pass over the weights."""
    tensors = list(_weight_tensors(ckpt))
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all().cpu() for _, _, t in tensors])
    if bool(finite.all()):
        return None
    bad = (~finite).nonzero().flatten().tolist()
    key, name, t = tensors[bad[0]]
    counts = ((int(torch.isnan(t).sum()), "NaN"), (int(torch.isinf(t).sum()), "Inf"))
    holds = " and ".join(f"{n} {what}" for n, what in counts if n)
    more = f"; {len(bad) - 1} more tensor{'s' * (len(bad) > 2)} too" if len(bad) > 1 else ""
    return f"{key}: {name} holds {holds}{more}"


def _check_finite(path: str, ckpt: Dict[str, Any]) -> None:
    """Refuse weights holding NaN or Inf: training from them only skips or diverges, and an
    export of them is useless."""
    where = non_finite(ckpt)
    if where:
        raise UserError(f"{path}: weights are not finite ({where}); this checkpoint cannot be trained from or "
                        f"exported: use an earlier checkpoint-N.pth of the run")


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
