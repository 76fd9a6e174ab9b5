"""Supervised training shared by fine-tuning and linear probing: one step, evaluation, results.

The epoch loop, checkpoints and logs are util/trainer.py's; this file says what a step and an
epoch's end mean for a classifier.
"""
import json
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from timm.optim import Lars, param_groups_layer_decay
from timm.utils import accuracy

from util import distributed as dist
from util.checkpoint import atomic_write
from util.runtime import autocast
from util.trainer import Step


# The two recipes' optimizers (MAE's): fine-tuning and the linear probe.
def finetune_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay: each group carries an `lr_scale` the schedule applies."""
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=next(model.parameters()).is_cuda)


def probe_optimizer(head: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """LARS on the head; the trust ratio adapts weight matrices only, not biases (as in MAE)."""
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": weights, "always_adapt": True},
                 {"params": others, "weight_decay": 0.0}],
                lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


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


class Classification:
    """The fine-tuning / probing engine run by util.trainer.Run.

    Args:
        kind: "finetune" or "linprobe" (checkpoints of one are refused by the other).
        module: what is checkpointed (the classifier, or the whole probe).
        forward: what is trained and evaluated (module, the probe's head on cached features,
            or either wrapped by DDP / torch.compile).
        mixup_fn: timm Mixup, turns labels into soft targets (N, num_classes).
        extra: facts recorded in checkpoints and results.json (e.g. the initialising checkpoint).
    """
    # Drop path, RandAugment, mixup: every rank must draw its own random numbers.
    seed_per_rank = True
    stat_names = {"loss": "train_loss"}

    def __init__(self, cfg, kind: str, module: torch.nn.Module, forward: Callable, optimizer,
                 criterion: Callable, test_loader, mixup_fn: Optional[Callable] = None,
                 extra: Optional[dict] = None):
        self.cfg, self.kind, self.module, self.forward = cfg, kind, module, forward
        self.optimizer, self.criterion, self.test_loader, self.mixup_fn = optimizer, criterion, test_loader, mixup_fn
        self.extra = extra or {}
        self.device = next(module.parameters()).device
        self.best, self.last = 0.0, {}

    def begin_epoch(self, epoch: int, resumed: bool) -> Dict[str, object]:
        self.forward.train()
        return {}

    def train_step(self, batch, step: Step) -> Optional[Dict[str, torch.Tensor]]:
        """x (N, C, H, W) or cached features (N, D), labels (N,) -> the batch's loss, or None if
        skipped. With --accum_iter K, one of K micro-batches of an optimizer step (util.trainer.Step)."""
        x, y = batch
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        if step.first:  # an optimizer step starts from zero gradients
            self.optimizer.zero_grad(set_to_none=True)
        with step.no_sync(self.forward):  # DDP all-reduces once per optimizer step, on its last batch
            with autocast(x.device, self.cfg.precision):
                loss = self.criterion(self.forward(x), y)
            # 1/K: the K micro-batches' gradients sum to their mean. Backward even on a step to
            # skip: DDP's reducer expects every forward to get one.
            (loss * step.loss_scale).backward()
        if step.skip(loss):  # non-finite (--skip_nonfinite): its optimizer step is skipped too
            return None
        if step.update:  # the optimizer step's last batch: clip the summed gradient, then step
            if getattr(self.cfg, "clip_grad", None):
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip_grad)
            self.optimizer.step()
        return {"loss": loss.detach()}

    def end_epoch(self, epoch: int) -> Dict[str, object]:
        self.last = evaluate(self.forward, self.test_loader, self.cfg.precision)
        self.best = max(self.best, self.last["test_acc1"])
        return {**self.last, "best_acc1": self.best}

    def summary(self, record: Dict[str, object]) -> str:
        return (f"train loss {record['train_loss']:.4f}, test acc@1 {record['test_acc1']:.2f} "
                f"(best {record['best_acc1']:.2f}), {record['seconds']:.1f}s")

    def state_dict(self) -> Dict[str, object]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "best_acc1": self.best, "last": self.last, **self.extra}

    def load_state_dict(self, ckpt: Dict[str, object]) -> None:
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.best, self.last = ckpt["best_acc1"], ckpt["last"]
        print(f"resumed {self.kind} at epoch {ckpt['epoch']} (best acc@1 so far {self.best:.2f})")

    def finish(self) -> None:
        """results.json, (re-)written by every run that ends finished, so none is ever missing."""
        results = {"kind": self.kind, "best_acc1": self.best, "last_acc1": self.last.get("test_acc1"),
                   "last_acc5": self.last.get("test_acc5"), "epochs": self.cfg.epochs, **self.extra}
        path = os.path.join(self.cfg.output_dir, "results.json")
        if dist.is_main():
            atomic_write(path, json.dumps(results, indent=2).encode())
        print(f"{self.kind}: best acc@1 {self.best:.2f}, last {results['last_acc1']:.2f} -> {path}")
