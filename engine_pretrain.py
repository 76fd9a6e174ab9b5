"""One pretraining epoch: mask, encode, decode, regress this epoch's target, step, update target."""
import time
from typing import Dict, Optional

import torch

from target_encoder import TargetEncoder
from util import distributed as dist
from util.lr_sched import adjust_learning_rate
from util.nonfinite import NonFiniteGuard
from util.runtime import autocast, epoch_batches
from util.signals import should_stop


def train_one_epoch(model: torch.nn.Module, target: TargetEncoder, loader, optimizer,
                    epoch: int, cfg, step: int, logger=None, forward=None, skip: int = 0,
                    stop=None, resume_rng: Optional[dict] = None,
                    guard: Optional[NonFiniteGuard] = None) -> Dict[str, float]:
    """Train `model` (the unwrapped MaskedAutoencoderViT) for one epoch.

    Args:
        loader: yields (imgs (N, C, H, W) on device, labels); `set_epoch` already called.
        step: global optimizer step at the start of the epoch (TensorBoard axis).
        forward: what runs the forward pass (`model` or its torch.compile'd twin).
        skip: batches of this epoch already trained before an interruption: drawn, not trained.
        stop: a util.signals.StopRequest; when set, return after the current step.
        resume_rng: RNG states saved with a mid-epoch checkpoint, restored after the skip.
        guard: --skip_nonfinite; a step it skips changes neither the model nor the target.
    Returns:
        averages over the steps trained (loss, target/prediction spread), last lr, images/s,
        seconds, `steps` run, `epoch_step` reached (== len(loader) unless stopped), and
        `bad_step` (first step of this epoch whose loss was not finite, or -1).
    """
    model.train()
    forward = forward or model
    heads = target.heads(epoch)
    n_steps = len(loader)
    # Running sums stay on the device: reading them costs a host sync, done every print_freq.
    sums: Dict[str, torch.Tensor] = {}
    # First non-finite step, tracked on the device and read when we sync anyway.
    bad_step = torch.full((), -1, dtype=torch.long, device=next(model.parameters()).device)
    guard = guard or NonFiniteGuard()
    lr, done, skipped = 0.0, skip, 0
    world, rank = dist.world(), dist.rank()
    t0 = time.time()
    bar, batches = epoch_batches(loader, epoch, skip, resume_rng)
    for i, (imgs, _) in batches:
        lr = adjust_learning_rate(optimizer, epoch + i / n_steps, cfg)
        # One global draw of mask noise, each rank keeping its rows (interleaved like the data
        # shards): N ranks x batch B mask exactly as one process with batch N*B would.
        noise = torch.rand(len(imgs) * world, model.encoder.num_patches, device=imgs.device)[rank::world]
        with autocast(imgs.device, cfg.precision):  # the target pass runs in bf16 too
            preds, mask = forward(imgs, cfg.mask_ratio, heads, noise)
            loss, stats = target.loss(model, imgs, preds, mask, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # even on a step to skip: DDP's reducer expects every forward to get one
        if guard.skip(loss, epoch, i):
            skipped += 1
        else:
            optimizer.step()
            target.on_step_end(epoch, model.encoder, step + i - skip + 1)
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), i, bad_step)
        done = i + 1
        if should_stop(stop, i + 1, cfg.print_freq, imgs.device):
            break
        if (i + 1) % cfg.print_freq == 0:
            loss_now = loss.item()  # host sync, once every print_freq steps
            if bad_step.item() >= 0:
                break  # stop early: later steps would only train on NaN weights
            bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.2e}")
            if logger is not None:
                logger.scalars({"train/loss": loss_now, "train/lr": lr}, step + i - skip + 1)
    seconds = time.time() - t0
    ran = done - skip
    out = {key: dist.mean_across_ranks(value / max(ran - skipped, 1)).item() for key, value in sums.items()}
    out.update(lr=lr, steps=ran, epoch_step=done, bad_step=int(bad_step.item()), seconds=seconds,
               images_per_s=ran * cfg.batch_size * world / max(seconds, 1e-9))
    if guard.enabled:
        out.setdefault("loss", float("nan"))  # every step of the epoch skipped: nothing to average
        out["skipped_steps"] = skipped
    return out
