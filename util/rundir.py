"""Guards for a run directory: writable before any work, never two runs mixed in one, no litter."""
import glob
import os
import re
from typing import Any, Dict, Optional

import yaml

from util.checkpoint import atomic_write
from util.errors import UserError

# Keys that may change between invocations of one run without changing what it computes.
NEUTRAL_KEYS = {"config", "resume", "output_dir", "data_path", "num_workers", "device", "print_freq",
                "save_freq", "epochs", "compile", "skip_nonfinite"}
# Temporary files of atomic writes and write probes: `<name>.tmp<pid>`, `.write_probe<pid>`.
_TEMP = re.compile(r"(\.tmp|^\.write_probe)(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temp(output_dir: str) -> None:
    """Remove temporary files left by killed runs (kill -9, power loss) in `output_dir`."""
    for path in glob.glob(os.path.join(output_dir, "*")) + glob.glob(os.path.join(output_dir, ".write_probe*")):
        m = _TEMP.search(os.path.basename(path))
        if m and os.path.isfile(path) and (int(m.group(2)) == os.getpid() or not _alive(int(m.group(2)))):
            os.remove(path)


def ensure_writable(output_dir: str) -> None:
    """Create the directory and write a probe file, so a full disk fails now, not after an epoch."""
    probe = os.path.join(output_dir, f".write_probe{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"output_dir {output_dir} is not writable ({e.strerror or e})")
    finally:
        if os.path.exists(probe):
            os.remove(probe)


# What every run saved before an option existed resolved it to, where that is not the option's
# default (fine-tuning/probing --input_size 0 means "the pretraining run's": it was 32).
LEGACY_VALUES = {"input_size": 32}


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def check_same_run(cfg_dict: Dict[str, Any], output_dir: str, resume: Optional[str],
                   resume_config: Optional[Dict[str, Any]], explicit: bool,
                   defaults: Optional[Dict[str, Any]] = None) -> None:
    """Refuse to mix two runs in `output_dir`.

    - continuing the directory's own checkpoint-last.pth implicitly (rerunning a command): its
      config (the checkpoint's, the source of truth) must equal this one on every key that
      changes what is computed;
    - an explicit --resume of a checkpoint of this directory continues it with the new settings;
    - an explicit --resume of another directory's checkpoint is refused when this directory
      already holds a run (it would be overwritten and log.txt mixed).
    """
    last = os.path.join(output_dir, "checkpoint-last.pth")
    if resume is None:
        return
    if explicit:
        if not _same_path(os.path.dirname(os.path.abspath(resume)), output_dir) and os.path.isfile(last):
            raise UserError(f"{output_dir} already holds another run ({last}); resuming {resume} there "
                            f"would overwrite it: use a new --output_dir")
        return
    # A key the saved config lacks is an option added since that run: it ran as the default.
    saved = {**(defaults or {}), **(resume_config or {})}
    differ = sorted(k for k in set(saved) | set(cfg_dict)
                    if k not in NEUTRAL_KEYS and saved.get(k) != cfg_dict.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg_dict.get(k)!r}" for k in differ[:4])
        raise UserError(f"{output_dir} holds a run with a different config ({shown}"
                        f"{', ...' if len(differ) > 4 else ''}); use a new --output_dir, or "
                        f"--resume {last} to continue it")


def prepare_output_dir(cfg, resume: Optional[str] = None, resume_ckpt: Optional[dict] = None,
                       write: bool = True) -> None:
    """Every guard, for a resolved config, before any work; then config.yaml is written.

    resume, resume_ckpt: the checkpoint this run continues (its own kind), if any.
    write: False on ranks that never write (torchrun ranks > 0).
    """
    check_same_run(cfg.to_dict(), cfg.output_dir, resume, (resume_ckpt or {}).get("config"),
                   explicit=bool(cfg.resume) and resume is not None and _same_path(cfg.resume, resume),
                   defaults={**type(cfg)().to_dict(), **LEGACY_VALUES})
    if write:
        ensure_writable(cfg.output_dir)
        sweep_stale_temp(cfg.output_dir)
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(os.path.join(cfg.output_dir, "config.yaml"), text.encode())

