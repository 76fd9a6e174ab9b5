"""FLOPs of one pretraining step, counted by torch.utils.flop_counter on the engine's own
train_step (forward, target pass, loss, backward): the compute measure that does not depend on
the machine or on what else it ran. Used by benchmarks/gpu_check.py (MFU) and by the schedule
plan's equal-compute comparison (results/flops.py)."""
from torch.utils.flop_counter import FlopCounterMode

from util.nonfinite import NonFiniteGuard
from util.trainer import Step


def count_step_flops(engine, batch, epoch: int) -> int:
    """FLOPs of engine.train_step(batch) in epoch `epoch`'s phase (engine.begin_epoch(epoch) runs
    first: the target that epoch regresses, e.g. the EMA teacher created at the switch). Counts
    matmuls and convolutions (what flop_counter knows), forward + backward; the optimizer and
    EMA updates are elementwise and not counted. The step does update the model's weights."""
    engine.begin_epoch(epoch, resumed=False)
    with FlopCounterMode(display=False) as counter:
        engine.train_step(batch, Step(epoch, 1, 1, NonFiniteGuard()))
    return int(counter.get_total_flops())
