"""Supervised loops shared by fine-tuning and linear probing: train an epoch, evaluate, fit."""
import json
import os
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from timm.utils import accuracy

from util.checkpoint import rng_state, save_checkpoint
from util.logger import RunLogger
from util.lr_sched import adjust_learning_rate
from util.nonfinite import NonFiniteGuard
from util import distributed as dist
from util.runtime import autocast, epoch_batches, seed_epoch
from util.signals import StopRequest, should_stop


def train_one_epoch(model: torch.nn.Module, criterion: Callable, loader, optimizer, epoch: int, cfg,
                    step: int, mixup_fn: Optional[Callable] = None,
                    logger: Optional[RunLogger] = None, skip: int = 0, stop=None,
                    resume_rng: Optional[dict] = None, guard: Optional[NonFiniteGuard] = None
                    ) -> Dict[str, float]:
    """One epoch of supervised training.

    Args:
        loader: yields (inputs on device, labels (N,) int64); `set_epoch` already called.
        mixup_fn: timm Mixup, turns labels into soft targets (N, num_classes).
        skip, stop, resume_rng, guard: as in engine_pretrain.train_one_epoch.
    Returns:
        mean train loss over the steps trained, last lr, `steps` run, `epoch_step` reached,
        `bad_step` (first non-finite step of the epoch or -1), seconds, images/s.
    """
    model.train()
    n_steps = len(loader)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    guard = guard or NonFiniteGuard()
    lr, done, skipped = 0.0, skip, 0
    t0 = time.time()
    bar, batches = epoch_batches(loader, epoch, skip, resume_rng)
    for i, (x, y) in batches:
        lr = adjust_learning_rate(optimizer, epoch + i / n_steps, cfg)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        with autocast(x.device, cfg.precision):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # even on a step to skip: DDP's reducer expects every forward to get one
        if guard.skip(loss, epoch, i):
            skipped += 1
        else:
            if getattr(cfg, "clip_grad", None):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            loss_sum += loss.detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), i, bad_step)
        done = i + 1
        if should_stop(stop, i + 1, cfg.print_freq, device):
            break
        if (i + 1) % cfg.print_freq == 0:
            loss_now = loss.item()  # host sync, once every print_freq steps
            if bad_step.item() >= 0:
                break
            bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.2e}")
            if logger is not None:
                logger.scalars({"train/loss": loss_now, "train/lr": lr}, step + i - skip + 1)
    seconds, ran = time.time() - t0, done - skip
    trained = ran - skipped
    out = {"train_loss": dist.mean_across_ranks(loss_sum / max(trained, 1)).item() if trained else float("nan"),
           "lr": lr, "steps": ran, "epoch_step": done, "bad_step": int(bad_step.item()), "seconds": seconds,
           "images_per_s": ran * cfg.batch_size * dist.world() / max(seconds, 1e-9)}
    if guard.enabled:
        out["skipped_steps"] = skipped
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, precision: str = "fp32") -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole loader."""
    model.eval()
    sums, n = None, 0
    for x, y in loader:
        with autocast(x.device, precision):
            out = model(x).float()
        acc1, acc5 = accuracy(out, y, topk=(1, 5))
        batch = torch.stack([F.cross_entropy(out, y), acc1, acc5]) * len(y)
        sums = batch if sums is None else sums + batch
        n += len(y)
    loss, acc1, acc5 = (sums / n).tolist()
    return {"test_loss": loss, "test_acc1": acc1, "test_acc5": acc5}


def fit(cfg, kind: str, model: torch.nn.Module, optimizer, criterion: Callable, train_loader,
        test_loader, own_ckpt: Optional[dict] = None, save_module: Optional[torch.nn.Module] = None,
        mixup_fn: Optional[Callable] = None, extra: Optional[dict] = None) -> Dict[str, float]:
    """Train for cfg.epochs with per-epoch evaluation, checkpoints, log.txt and results.json.

    Args:
        model: what is trained and evaluated (for cached-feature probing: the head alone).
        save_module: what is checkpointed (default `model`; the full probe when training its head).
        own_ckpt: this script's checkpoint to continue from.
        extra: facts recorded in checkpoints and results.json (e.g. the initialising checkpoint).
    """
    save_module = save_module or model
    extra = extra or {}
    start_epoch, step, best, last, epoch_step, resumed_rng = 0, 0, 0.0, {}, 0, None
    guard = NonFiniteGuard(cfg.skip_nonfinite)
    if own_ckpt is not None:
        save_module.load_state_dict(own_ckpt["model"])
        optimizer.load_state_dict(own_ckpt["optimizer"])
        start_epoch, step = own_ckpt["epoch"], own_ckpt["step"]
        best, last = own_ckpt["best_acc1"], own_ckpt["last"]
        epoch_step = own_ckpt.get("epoch_step", 0)  # > 0: stopped inside epoch `start_epoch`
        resumed_rng = own_ckpt["rng"] if epoch_step else None
        guard.skipped = own_ckpt.get("skipped_nonfinite", 0)
        print(f"resumed {kind} at epoch {start_epoch} (best acc@1 so far {best:.2f})")
    logger = RunLogger(cfg.output_dir, enabled=dist.is_main())
    last_path = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    stop = StopRequest()
    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(model, criterion, train_loader, optimizer, epoch, cfg, step, mixup_fn, logger,
                                skip=epoch_step, stop=stop, resume_rng=resumed_rng, guard=guard)
        resumed_rng = None
        if stats.pop("bad_step") >= 0:  # nothing is saved: the last good checkpoint stays
            sys.exit(f"error: non-finite loss at epoch {epoch}; stopped without saving; last good "
                     f"checkpoint: {last_path if os.path.isfile(last_path) else 'none'}{guard.note()}")
        step += stats.pop("steps")
        epoch_step = stats.pop("epoch_step")
        finished = epoch_step == len(train_loader)
        if finished:
            last = evaluate(model, test_loader, cfg.precision)
            best = max(best, last["test_acc1"])
        state = {"kind": kind, "model": save_module.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch + 1 if finished else epoch, "epoch_step": 0 if finished else epoch_step,
                 "step": step, "config": cfg.to_dict(), "best_acc1": best, "last": last,
                 "rng": rng_state(), "skipped_nonfinite": guard.skipped, **extra}
        if dist.is_main():
            save_checkpoint(state, last_path)
        if finished:
            epoch_step = 0
            if dist.is_main() and ((epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.epochs):
                save_checkpoint(state, os.path.join(cfg.output_dir, f"checkpoint-{epoch + 1}.pth"))
            logger.epoch({"epoch": epoch, **stats, **last, "best_acc1": best, "step": step})
            print(f"epoch {epoch}: train loss {stats['train_loss']:.4f}, test acc@1 {last['test_acc1']:.2f} "
                  f"(best {best:.2f}), {stats['seconds']:.1f}s")
        if not finished or (stop.requested and epoch + 1 < cfg.epochs):
            print(f"{stop.signal_name}: stopped in epoch {epoch}; saved {last_path}. "
                  f"Rerun the same command to continue.")
            stop.restore()
            logger.close()
            return {}
    stop.restore()
    logger.close()
    results = {"kind": kind, "best_acc1": best, "last_acc1": last.get("test_acc1"),
               "last_acc5": last.get("test_acc5"), "epochs": cfg.epochs, **extra}
    if dist.is_main():
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    dist.barrier()
    print(f"{kind}: best acc@1 {best:.2f}, last {results['last_acc1']:.2f} -> "
          f"{os.path.join(cfg.output_dir, 'results.json')}")
    return results
