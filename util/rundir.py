"""Guards for a run directory: writable before any work, and never two configs mixed in one."""
import os
from typing import Any, Dict

import yaml

from util.errors import UserError

# Keys that may change between invocations of one run without changing what it computes.
NEUTRAL_KEYS = {"config", "resume", "output_dir", "data_path", "num_workers", "device", "print_freq",
                "save_freq", "epochs", "compile", "skip_nonfinite"}


def ensure_writable(output_dir: str) -> None:
    """Create the directory and write a probe file, so a full disk fails now, not after an epoch."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_probe{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output_dir {output_dir} is not writable ({e.strerror or e})")


def check_same_run(cfg_dict: Dict[str, Any], output_dir: str, explicit_resume: bool) -> None:
    """Refuse to continue a run in `output_dir` whose saved config differs from this one.

    An explicit --resume of that run's checkpoint is the user saying "continue it with these
    settings", so it is allowed.
    """
    path = os.path.join(output_dir, "config.yaml")
    if explicit_resume or not os.path.isfile(path) or not os.path.isfile(
            os.path.join(output_dir, "checkpoint-last.pth")):
        return
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    differ = sorted(k for k in set(saved) | set(cfg_dict)
                    if k not in NEUTRAL_KEYS and saved.get(k) != cfg_dict.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg_dict.get(k)!r}" for k in differ[:4])
        raise UserError(f"{output_dir} holds a run with a different config ({shown}"
                        f"{', ...' if len(differ) > 4 else ''}); use a new --output_dir, or "
                        f"--resume {os.path.join(output_dir, 'checkpoint-last.pth')} to continue it")


def prepare_output_dir(cfg, write: bool = True) -> None:
    """Both guards, for a resolved config; `write=False` on ranks that never write."""
    check_same_run(cfg.to_dict(), cfg.output_dir, explicit_resume=bool(cfg.resume))
    if write:
        ensure_writable(cfg.output_dir)
