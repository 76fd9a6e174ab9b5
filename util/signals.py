"""Graceful stop: SIGTERM/SIGINT ask the loop to finish its current step and checkpoint.

Launchers stop a run by signalling its whole process group (Slurm's scancel, `timeout`,
systemd, Ctrl-C in a shell): DataLoader workers get the signal too. The main process alone
decides when to stop, so workers ignore both signals (`worker_ignores_stops`, every loader's
worker_init_fn); they end when the main process shuts its loaders down, or, if it was killed,
when torch's watchdog sees their parent gone.
"""
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A launcher may deliver one stop twice: systemd's cgroup kill and Slurm's scancel signal every
# process of the job, and reproduce.py also passes the stop on to its stage. A repeat within this
# many seconds is that same stop; a later one is a person insisting (a second Ctrl-C) and kills.
DUPLICATE_WINDOW_S = 2.0


class StopRequest:
    """Installs handlers; `requested` becomes True on the first SIGTERM or SIGINT.

    A second signal more than DUPLICATE_WINDOW_S later restores the default handler's behaviour
    (a second Ctrl-C kills); one sooner is the same stop delivered twice, and is ignored.
    """

    def __init__(self):
        self.requested = False
        self.signal_name, self.signal_number = "", 0
        self._first = 0.0
        self._old = {}
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < DUPLICATE_WINDOW_S:
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.requested, self._first = True, time.monotonic()
        self.signal_name, self.signal_number = signal.Signals(signum).name, signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def worker_ignores_stops(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a stop signal sent to the process group is the main process's
    to handle. Without this, torch's worker handler dies on SIGTERM (Python's default kills it
    on SIGINT) and the main process fails with "DataLoader worker ... killed" before it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_term)


# A worker outlives a SIGTERM by this long: the main process saves and shuts its loaders down well
# within it, and a worker torch itself terminates (stuck at a loader's shutdown) still ends.
WORKER_GRACE_S = 30


def _worker_term(signum, frame) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WORKER_GRACE_S)


def should_stop(stop, steps_done: int, print_freq: int, device) -> bool:
    """Checked after every step. Under DDP all ranks must stop at the same step, so they
    vote (one collective) at the print_freq sync points; a single process reads the flag."""
    from util import distributed as dist
    if stop is None:
        return False
    if dist.world() == 1:
        return stop.requested
    return steps_done % print_freq == 0 and dist.any_rank(stop.requested, device)
