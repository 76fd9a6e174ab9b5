"""Graceful stop: SIGTERM/SIGINT ask the loop to finish its current step and checkpoint."""
import signal


class StopRequest:
    """Installs handlers; `requested` becomes True on the first SIGTERM or SIGINT.

    A second signal restores the default handler's behaviour (a second Ctrl-C kills).
    """

    def __init__(self):
        self.requested = False
        self.signal_name, self.signal_number = "", 0
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.requested = True
        self.signal_name, self.signal_number = signal.Signals(signum).name, signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def should_stop(stop, steps_done: int, print_freq: int, device) -> bool:
    """Checked after every step. Under DDP all ranks must stop at the same step, so they
    vote (one collective) at the print_freq sync points; a single process reads the flag."""
    from util import distributed as dist
    if stop is None:
        return False
    if dist.world() == 1:
        return stop.requested
    return steps_done % print_freq == 0 and dist.any_rank(stop.requested, device)
