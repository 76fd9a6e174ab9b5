"""Guards for a run directory: one run at a time, never two runs mixed in one, no litter.

- A run holds a lock on its output directory for its lifetime (`claim`): a second run started
  there is refused in one line naming the holder. The lock is a POSIX record lock
  (fcntl.lockf) on OUTPUT_DIR/.lock: the kernel drops it when the holder dies, kill -9
  included, so a dead run never blocks the next one; forked DataLoader workers do not inherit it.
- Continuing a checkpoint (`adopt_checkpoint_config`): the checkpoint's config, the source of
  truth, supplies every training-defining key the command did not set, said in one line;
  a key the command sets to another value is refused (rerunning into the run's own directory)
  or taken and said (an explicit --resume); keys that shape the weights cannot change.
- A refused start leaves nothing: config.yaml is written when training starts
  (`write_config`), and a directory this run created holding nothing but its lock is removed.
"""
import fcntl
import glob
import os
import re
import socket
import sys
import time
from typing import Any, Dict, Optional

import yaml

from util import distributed as dist
from util.checkpoint import atomic_write
from util.errors import UserError, at_end

# Keys about this invocation only: never taken from a checkpoint, never compared.
LOCAL_KEYS = {"config", "resume", "output_dir", "data_path", "num_workers", "device"}
# Keys that may change between invocations of one run without changing what it computes
# (--epochs extends a run); taken from the checkpoint when the command does not set them.
NEUTRAL_KEYS = LOCAL_KEYS | {"print_freq", "save_freq", "epochs", "compile", "skip_nonfinite"}
# Adopted without a word: how often a run logs and saves changes nothing it computes.
BOOKKEEPING = ("print_freq", "save_freq")
# Keys a resumed run cannot change: the checkpoint's weights are shaped by them.
SHAPE_KEYS = ("model", "input_size", "feature_decoder")
# The inputs of the derived lr (RunConfig.resolve).
LR_INPUTS = ("lr", "blr", "batch_size", "accum_iter")
# Temporary files of atomic writes and write probes: `<name>.tmp<pid>`, `.write_probe<pid>`.
_TEMP = re.compile(r"(\.tmp|^\.write_probe)(\d+)$")
LOCK_NAME = ".lock"
_held: Dict[str, int] = {}  # real path of an output directory this process holds -> lock fd


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


def claim(output_dir: str) -> None:
    """Hold OUTPUT_DIR's lock until this script's main ends; refuse in one line if another live
    run holds it. Re-entrant within a process (in-process runs one after another, as tests do)."""
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    created = not os.path.isdir(output_dir)
    ensure_writable(output_dir)
    path = os.path.join(output_dir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (11, 13):  # EAGAIN / EACCES: held by a live process
                raise UserError(f"{output_dir} is in use by another run ({holder}); wait for it to end "
                                f"or use another --output_dir")
            print(f"note: {output_dir}: this filesystem does not support locks ({e.strerror}); a second "
                  f"run started here would not be stopped", file=sys.stderr)
            return
        try:  # a refused run may have removed the file between our open and our lock: retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv[:1])}\n".encode())
    _held[key] = fd
    at_end(lambda: _release(key, output_dir, path, created))


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip().rstrip(":") or "holder unknown"
    except OSError:
        return "holder unknown"


def _release(key: str, output_dir: str, path: str, created: bool) -> None:
    """Give the lock back. A directory that holds nothing but the lock was a refused start:
    the lock goes, and the directory too if this run created it."""
    fd = _held.pop(key)
    try:
        if os.listdir(output_dir) == [LOCK_NAME]:
            os.remove(path)  # still locked by us: a run waiting on it re-checks the inode
            if created:
                os.rmdir(output_dir)
    except OSError:
        pass
    finally:
        os.close(fd)


# What every run saved before an option existed resolved it to, where that is not the option's
# default (fine-tuning/probing --input_size 0 means "the pretraining run's": it was 32).
LEGACY_VALUES = {"input_size": 32}
# Saved as the values a run used, which (unless set) are its dataset's (config.resolve).
DATASET_STATS = ("norm_mean", "norm_std")


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def adopt_checkpoint_config(cfg, ckpt: Dict[str, Any], path: str, explicit: bool) -> None:
    """Make `cfg` the config of the run `ckpt` continues, in place, and say what that took.

    Keys the command did not set (cfg.given) take the checkpoint's values: `--resume RUN/ckpt`
    alone continues RUN's method, never the defaults'. Keys it set to another value: refused
    when rerunning into the run's own directory (implicit: a different experiment there), taken
    and said with an explicit --resume; SHAPE_KEYS never change. The lr follows: kept when its
    inputs are kept, derived again from blr when the command changes them.
    """
    defaults = {**type(cfg)().to_dict(), **LEGACY_VALUES}  # keys added since that run ran as defaults
    saved, now = {**defaults, **(ckpt.get("config") or {})}, cfg.to_dict()
    differ = sorted(k for k in now if k not in LOCAL_KEYS and k != "lr" and saved.get(k) != now[k])
    given = [k for k in differ if k in cfg.given and k not in NEUTRAL_KEYS]
    fixed = [k for k in given if k in SHAPE_KEYS]
    if fixed:
        raise UserError(f"{path} holds a run of {_pairs(saved, fixed)}; its weights cannot continue as "
                        f"{_pairs(now, fixed)}: drop the flag, or start a new run")
    if given and not explicit:
        last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
        raise UserError(f"{cfg.output_dir} holds a run with a different config "
                        f"({_changes(saved, now, given)}); use a new --output_dir, or --resume {last} to "
                        f"continue it with these settings")
    # the input statistics follow the dataset: recorded for the checkpoint's, not adopted for another
    adopted = [k for k in differ if k not in cfg.given and not (k in DATASET_STATS and "dataset" in given)]
    for k in adopted:
        setattr(cfg, k, saved[k])
    if "lr" not in cfg.given:  # set by --lr then: kept; derived: derived again from blr and batch
        if _lr_was_set(saved, ckpt) and not any(k in given for k in LR_INPUTS):
            if cfg.lr != saved["lr"]:
                adopted.append("lr")
            cfg.lr = saved["lr"]
        else:
            cfg.lr = None
            cfg.resolve(world_size=dist.world())
    said = [k for k in adopted if k not in BOOKKEEPING]
    if said:
        print(f"continuing {path} as it ran (not set by this command): "
              f"{', '.join(f'{k} {saved[k]!r}' for k in said)}")
    if given:
        print(f"continuing {path} with changed settings: {_changes(saved, now, given)}")


def _lr_was_set(saved: Dict[str, Any], ckpt: Dict[str, Any]) -> bool:
    """The saved lr was set by --lr, not derived from blr at the world size that ran it."""
    if saved.get("lr") is None:
        return False
    derived = saved["blr"] * saved["batch_size"] * saved["accum_iter"] * (ckpt.get("world_size") or 1) / 256
    return abs(saved["lr"] - derived) > 1e-9 * abs(derived)


def _pairs(values: Dict[str, Any], keys) -> str:
    return ", ".join(f"{k} {values.get(k)!r}" for k in keys)


def _changes(saved: Dict[str, Any], now: Dict[str, Any], keys) -> str:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys[:4])
    return shown + (", ..." if len(keys) > 4 else "")


def check_not_finished(cfg, ckpt: Dict[str, Any], path: str, own: bool) -> None:
    """A checkpoint already at (or past) --epochs has nothing left to train: said for the run's own
    directory (the run only re-makes lost outputs), refused for a new one (it would stay empty)."""
    done = ckpt.get("epoch", 0)
    if ckpt.get("epoch_step", 0) or done < cfg.epochs:
        return
    at = f"{path} is already at epoch {done} of --epochs {cfg.epochs}"
    if not own:
        raise UserError(f"{at}: nothing to train into {cfg.output_dir}; pass a larger --epochs to train on")
    print(f"{at}: nothing to train (pass a larger --epochs to train on)")


def prepare_output_dir(cfg, resume: Optional[str] = None, resume_ckpt: Optional[dict] = None,
                       write: bool = True) -> None:
    """Every guard, for a resolved config, before any work: the directory's lock, the
    checkpoint's config merged in, a run finished already, writable, temporary files swept.
    config.yaml is written when training starts (`write_config`), so a refused start leaves none.

    resume, resume_ckpt: the checkpoint this run continues (its own kind), if any.
    write: False on ranks that never write (torchrun ranks > 0).
    """
    last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    if write:
        claim(cfg.output_dir)
    if resume is not None:
        own = _same_path(os.path.dirname(os.path.abspath(resume)), cfg.output_dir)
        explicit = bool(cfg.resume) and _same_path(cfg.resume, resume)
        if explicit and not own and os.path.isfile(last):
            raise UserError(f"{cfg.output_dir} already holds another run ({last}); resuming {resume} there "
                            f"would overwrite it: use a new --output_dir")
        adopt_checkpoint_config(cfg, resume_ckpt, resume, explicit)
        check_not_finished(cfg, resume_ckpt, resume, own)
    cfg.validate()  # every rule on the merged config (parse_config leaves them to here on a resume)
    if write:
        sweep_stale_temp(cfg.output_dir)


def write_config(cfg) -> None:
    """OUTPUT_DIR/config.yaml: the resolved config this run trains with (rank 0)."""
    if dist.is_main():
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(os.path.join(cfg.output_dir, "config.yaml"), text.encode())
