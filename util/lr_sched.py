"""Learning-rate schedule: a pure function of the fractional epoch (exact on resume).

util.trainer sets it at the first batch of every optimizer step, at epoch + batch / batches of
the epoch; with --accum_iter K, at batches 0, K, 2K, ... (official MAE's
`if data_iter_step % accum_iter == 0`), so B x K follows the schedule of batch K*B."""
import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: int, epochs: int) -> float:
    """Linear warm-up from 0 to `lr` over `warmup_epochs`, then half-cycle cosine to `min_lr`."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch: float, cfg) -> float:
    """Set every param group's lr (times its `lr_scale`, e.g. from layer decay); return the base lr."""
    lr = lr_at(epoch, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
