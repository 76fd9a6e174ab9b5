"""--skip_nonfinite N: step over up to N optimizer steps whose loss is NaN/inf, over a whole run.

Off (N = 0, the default) a non-finite loss stops the run without saving, and the check costs no
host sync: the engines track the first bad step on the device. On, every step's loss is read
after backward (one host sync per step, plus one all-reduce under torchrun, so all ranks skip the
same steps: DDP has already spread one rank's NaN gradients to every rank) and a bad step gets
no optimizer step and no target update. What the forward pass did is not undone (BatchNorm
running statistics of a linear probe's head). The count survives resume through the checkpoint,
so N bounds the whole run, not each invocation.
"""
import torch

from util import distributed as dist


class NonFiniteGuard:
    def __init__(self, budget: int = 0, skipped: int = 0):
        self.budget = budget
        self.skipped = skipped  # steps skipped so far in this run

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def skip(self, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """True if this step must be skipped: its loss is not finite and the budget allows it.

        A bad step beyond the budget returns False; the engine then records it and the run stops.
        """
        if not self.enabled or self.skipped >= self.budget:
            return False
        if not dist.any_rank(not bool(torch.isfinite(loss.detach()).all()), loss.device):
            return False
        self.skipped += 1
        print(f"warning: non-finite loss at epoch {epoch}, step {step}: step skipped "
              f"({self.skipped} of --skip_nonfinite {self.budget})")
        return True

    def note(self) -> str:
        """Ends the stop message of a run that hit a non-finite loss."""
        if self.enabled:
            return f" (after skipping {self.skipped} bad steps, the most --skip_nonfinite {self.budget} allows)"
        return " (to step over isolated bad batches, rerun with --skip_nonfinite N)"
