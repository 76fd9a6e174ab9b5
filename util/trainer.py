"""The one epoch loop every script runs, and the training state that goes into checkpoints.

An engine (engine_pretrain.Pretraining, engine_finetune.Classification) says what one step
and one epoch's end mean for its task; everything else about a run lives here, once:

    for each epoch: seed, set the loader's epoch, engine.begin_epoch
        for each batch: lr schedule (at an optimizer step's first batch), engine.train_step,
            running sums; after an optimizer step's last batch: progress, signal stop
        engine.end_epoch (evaluation, target update), checkpoint-last (the commit point),
        then what derives from it: checkpoint-N.pth and the epoch's log.txt line

Gradient accumulation (--accum_iter K, as official MAE): K consecutive batches of an epoch
(micro-batches) make one optimizer step, their losses scaled by 1/K so the summed gradient is
the mean over the K batches: batch B x K steps as batch K*B would. The lr is set at each group's
first batch (MAE: `if data_iter_step % accum_iter == 0`). An epoch whose length is not a multiple
of K ends with a shorter group, flushed as a step of its own (its losses scaled by 1/its size),
so no gradient is carried across an epoch's end: checkpoints (epoch ends, and stops, which wait
for the end of the current group) never fall inside a group, and resume stays exact. (Official
MAE instead drops such a remainder: it zeroes the gradients at each epoch's start.)

Guarantees, each tested: a stop (SIGTERM/SIGINT) finishes the current optimizer step (all its
micro-batches), saves a mid-epoch checkpoint and exits 128 + signal number; rerunning resumes at that exact step (RNG state and
the epoch's running sums included, so the log line equals an uninterrupted run's); a NaN/inf
loss stops without saving (or is skipped, --skip_nonfinite); a crash after the commit point is
repaired by the next run, which rewrites the missing checkpoint-N.pth and log line.
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from util import distributed as dist
from util.checkpoint import non_finite, rng_state, save_checkpoint
from util.errors import UserError
from util.logger import RunLogger
from util.lr_sched import adjust_learning_rate
from util.nonfinite import NonFiniteGuard
from util.rundir import write_config
from util.runtime import epoch_batches, seed_epoch
from util.signals import StopRequest, should_stop


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint and restored from it.

    epoch: the epoch to run next, or the one in progress when epoch_step > 0.
    step: optimizer steps taken over the whole run, skipped ones included (the TensorBoard
        axis); batches / accum_iter with --accum_iter.
    epoch_step: batches of `epoch` already done (a mid-epoch checkpoint; always the end of an
        optimizer step).
    skipped: non-finite steps skipped so far (--skip_nonfinite bounds the whole run).
    sums, trained: running sums of the epoch's step statistics and how many steps they hold.
    rng: RNG states at a mid-epoch checkpoint, restored before its next batch.
    record: the log line of the last finished epoch (re-written if a crash lost it).
    world_size: the processes that wrote the checkpoint (a mid-epoch one continues only with as
        many: the rest of its epoch is sharded for them). None: an older checkpoint.
    """
    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    skipped: int = 0
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    trained: int = 0
    rng: Optional[dict] = None
    record: Optional[dict] = None
    world_size: Optional[int] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "skipped_nonfinite": self.skipped, "rng": rng_state(), "log_record": self.record,
                "epoch_sums": {k: v.detach().cpu() for k, v in self.sums.items()},
                "epoch_trained": self.trained, "world_size": dist.world()}

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> "TrainState":
        """Older checkpoints lack the newer keys: they read as their defaults."""
        mid_epoch = ckpt.get("epoch_step", 0) > 0
        return cls(epoch=ckpt["epoch"], step=ckpt["step"], epoch_step=ckpt.get("epoch_step", 0),
                   skipped=ckpt.get("skipped_nonfinite", 0), rng=ckpt["rng"] if mid_epoch else None,
                   sums=dict(ckpt.get("epoch_sums") or {}) if mid_epoch else {},
                   trained=ckpt.get("epoch_trained", 0) if mid_epoch else 0,
                   record=ckpt.get("log_record"), world_size=ckpt.get("world_size"))


@dataclass
class Group:
    """The batches [start, end) of an epoch that make one optimizer step (--accum_iter)."""
    start: int
    end: int
    skipped: bool = False  # one of its batches had a non-finite loss: no optimizer step

    @classmethod
    def opened_by(cls, index: int, accum_iter: int, batches: int) -> "Group":
        """The group batch `index` opens: up to the next multiple of accum_iter, or the epoch's end.
        Groups start at multiples of accum_iter, except the first one after a resume from a
        checkpoint written with another --accum_iter."""
        return cls(index, min(index - index % accum_iter + accum_iter, batches))


def optimizer_steps(batches: int, accum_iter: int) -> int:
    """Optimizer steps in an epoch of `batches` batches (the last takes the remainder)."""
    return -(-batches // accum_iter)


@dataclass
class Step:
    """What an engine's train_step knows about the batch it runs.

    An optimizer step is made of the batches of `group` (one batch without --accum_iter). The
    engine zeroes the gradients on the `first`, scales every loss by `loss_scale`, runs the
    forward and backward inside `no_sync(forward)`, asks `skip(loss)`, and steps the optimizer
    (and updates the target) where `update` says so.
    """
    epoch: int
    index: int        # batch index within the epoch
    global_step: int  # the optimizer step this batch contributes to, over the run (1-based)
    guard: NonFiniteGuard
    group: Optional[Group] = None  # default: this batch alone

    def __post_init__(self):
        if self.group is None:
            self.group = Group(self.index, self.index + 1)

    @property
    def first(self) -> bool:
        """The group's first batch: the optimizer step starts from zero gradients."""
        return self.index == self.group.start

    @property
    def last(self) -> bool:
        return self.index == self.group.end - 1

    @property
    def loss_scale(self) -> float:
        """1 / the group's batches: the gradients they sum to are the mean over them."""
        return 1.0 / (self.group.end - self.group.start)

    @property
    def update(self) -> bool:
        """Step the optimizer after this batch: the group's last, none of its batches skipped."""
        return self.last and not self.group.skipped

    def skip(self, loss: torch.Tensor) -> bool:
        """--skip_nonfinite: True if this batch's loss is to be skipped (call after backward, on
        every batch: under torchrun a collective). Its group then takes no optimizer step: the
        gradients summed so far already hold the non-finite values."""
        bad = self.guard.skip(loss, self.epoch, self.index)
        self.group.skipped |= bad
        return bad

    def no_sync(self, module):
        """Context for this batch's forward and backward: DDP's no_sync (no gradient all-reduce)
        on every batch of a group but its last, whose backward all-reduces the summed gradients
        once. A no-op for a plain module (one process) and for the group's last batch."""
        sync_off = getattr(module, "no_sync", None)
        return contextlib.nullcontext() if self.last or sync_off is None else sync_off()


class Run:
    """Runs `engine` from `state` to cfg.epochs over `loader`, checkpointing into cfg.output_dir."""

    def __init__(self, cfg, engine, loader, resumed_from: Optional[Dict[str, Any]] = None,
                 resumed_path: Optional[str] = None):
        """resumed_from: the checkpoint dict this run continues (the engine has loaded its
        weights already), read from `resumed_path`. When that is a checkpoint of
        cfg.output_dir itself, log.txt is rewound to it and what a crash lost is re-made."""
        self.cfg, self.engine, self.loader = cfg, engine, loader
        self.state = TrainState.from_checkpoint(resumed_from) if resumed_from else TrainState()
        self._check_world(resumed_path)
        self._check_accum_iter()
        self.own_run = resumed_path is not None and (
            os.path.dirname(os.path.abspath(resumed_path)) == os.path.abspath(cfg.output_dir))
        self.guard = NonFiniteGuard(cfg.skip_nonfinite, self.state.skipped)
        self.logger = RunLogger(cfg.output_dir, enabled=dist.is_main())
        self.last_path = os.path.join(cfg.output_dir, "checkpoint-last.pth")

    def _check_world(self, path: Optional[str]) -> None:
        """A mid-epoch checkpoint continues only with the process count that wrote it: the rest
        of its epoch (which images, in which batches) is sharded for that many. An epoch-end
        checkpoint continues on any layout (docs/MULTINODE.md)."""
        state, now = self.state, dist.world()
        if state.epoch_step and state.world_size not in (None, now):
            raise UserError(f"{path}: stopped inside epoch {state.epoch} (batch {state.epoch_step}) with "
                            f"{state.world_size} processes; finish that epoch with {state.world_size} (torchrun "
                            f"--nnodes x --nproc_per_node), not {now}, then change the layout")

    def _check_accum_iter(self) -> None:
        """--accum_iter beyond an epoch's batches: no optimizer step would see the effective batch
        (and lr) the run announces, since groups end with the epoch."""
        k, n = self.cfg.accum_iter, len(self.loader)
        if k > n:
            raise UserError(f"accum_iter {k} is larger than the {n} batches of an epoch (batch_size "
                            f"{self.cfg.batch_size} x {dist.world()} process(es)): no optimizer step would use "
                            f"the effective batch {self.cfg.batch_size * k * dist.world()}; use --accum_iter {n} "
                            f"or less")

    def fit(self) -> None:
        """Train to the end or to a stop; exits non-zero on a stop or a non-finite loss."""
        cfg, engine, state = self.cfg, self.engine, self.state
        write_config(cfg)  # now, not at the checks: a refused start leaves no config.yaml
        self._repair_outputs()
        stop = StopRequest()
        try:
            for epoch in range(state.epoch, cfg.epochs):
                seed_epoch(cfg.seed, epoch, dist.rank() if engine.seed_per_rank else 0)
                self.loader.set_epoch(epoch)
                info = engine.begin_epoch(epoch, resumed=state.epoch_step > 0)
                stats = self._train_epoch(epoch, stop)
                if state.epoch_step < len(self.loader):  # stopped inside the epoch
                    self._save(self.last_path)
                    self._exit_stopped(stop, f"stopped at epoch {epoch}, step {state.epoch_step}")
                record = {"epoch": epoch, **info, **stats, **engine.end_epoch(epoch), "step": state.step,
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                state.epoch, state.epoch_step, state.sums, state.trained, state.record = epoch + 1, 0, {}, 0, record
                self._save(self.last_path)  # the commit point; what follows is derived from it
                self._write_outputs(record)
                print(f"epoch {epoch}: {engine.summary(record)}")
                if stop.requested and epoch + 1 < cfg.epochs:
                    self._exit_stopped(stop, f"stopped after epoch {epoch}")
        finally:
            stop.restore()
            self.logger.close()
        engine.finish()
        dist.barrier()  # rank 0's last save is on disk before any rank exits

    def _train_epoch(self, epoch: int, stop: StopRequest) -> Dict[str, float]:
        """The batches of one epoch from state.epoch_step on; returns the epoch's averages."""
        cfg, state, n, k = self.cfg, self.state, len(self.loader), self.cfg.accum_iter
        # First non-finite step, tracked on the device and read when we sync anyway.
        bad = torch.full((), -1, dtype=torch.long, device=self.engine.device)
        lr, start, t0, group = 0.0, state.epoch_step, time.time(), None
        bar, batches = epoch_batches(self.loader, epoch, state.epoch_step, state.rng)
        for i, batch in batches:
            if group is None or i == group.end:  # the first batch of an optimizer step
                group = Group.opened_by(i, k, n)
                lr = adjust_learning_rate(self.engine.optimizer, epoch + i / n, cfg)
            out = self.engine.train_step(batch, Step(epoch, i, state.step + 1, self.guard, group))
            state.epoch_step = i + 1
            if out is not None:  # None: a skipped non-finite step
                self._accumulate(out)
                bad = torch.where((bad < 0) & ~torch.isfinite(out["loss"]), i, bad)
            if i + 1 < group.end:  # inside a group: no stop, so no checkpoint holds half a step
                continue
            state.step += 1
            done = optimizer_steps(i + 1, k)  # this epoch's optimizer steps: the same on every rank
            if should_stop(stop, done, cfg.print_freq, self.engine.device):
                break
            if done % cfg.print_freq == 0:
                if bad.item() >= 0:  # host sync, once every print_freq steps
                    break  # later steps would only train on NaN weights
                self._progress(bar, out, lr)
        if bad.item() >= 0:  # nothing is saved: the last good checkpoint stays as it is
            last = self.last_path if os.path.isfile(self.last_path) else "none"
            sys.exit(f"error: non-finite loss at epoch {epoch}, step {int(bad.item())} of the epoch; "
                     f"stopped without saving; last good checkpoint: {last}{self.guard.note()}")
        return self._averages(lr, state.epoch_step - start, time.time() - t0)

    def _accumulate(self, out: Dict[str, torch.Tensor]) -> None:
        """Running sums stay on the device: reading them costs a host sync."""
        sums = self.state.sums
        for key, value in out.items():
            value = value.detach().float().to(self.engine.device)
            sums[key] = sums[key] + value if key in sums else value.clone()
        self.state.trained += 1

    def _progress(self, bar, out: Optional[Dict[str, torch.Tensor]], lr: float) -> None:
        if out is None:
            return
        loss = out["loss"].item()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.logger.scalars({"train/loss": loss, "train/lr": lr}, self.state.step)

    def _averages(self, lr: float, ran: int, seconds: float) -> Dict[str, float]:
        """Means over every trained step of the epoch, those before a resume included."""
        state, names = self.state, self.engine.stat_names
        out = {names.get(k, k): dist.mean_across_ranks(v.to(self.engine.device) / max(state.trained, 1)).item()
               for k, v in state.sums.items()}
        if not state.trained:  # every step of the epoch skipped: nothing to average
            out[names.get("loss", "loss")] = float("nan")
        out.update(lr=lr, seconds=seconds,
                   images_per_s=ran * self.cfg.batch_size * dist.world() / max(seconds, 1e-9))
        if self.guard.enabled:  # a finished epoch: every batch was either trained or skipped
            out["skipped_steps"] = len(self.loader) - state.trained
        return out

    def _checkpoint(self) -> Dict[str, Any]:
        self.state.skipped = self.guard.skipped
        return {"kind": self.engine.kind, **self.engine.state_dict(), **self.state.state_dict(),
                "config": self.cfg.to_dict()}

    def _save(self, path: str) -> None:
        """Save, unless the weights went non-finite (a finite loss can still step into NaN/Inf):
        then nothing is written over the last good checkpoint and the run stops. Checked on every
        rank (they hold the same weights), so all ranks stop together."""
        ckpt = self._checkpoint()
        bad = non_finite(ckpt)
        if bad:
            last = self.last_path if os.path.isfile(self.last_path) else "none"
            sys.exit(f"error: the weights are not finite ({bad}) at epoch {self.state.epoch}, step "
                     f"{self.state.epoch_step} of the epoch; not saved; last good checkpoint: {last}")
        if dist.is_main():
            save_checkpoint(ckpt, path)

    def _write_outputs(self, record: Dict[str, Any]) -> None:
        """checkpoint-N.pth when due, and the epoch's log line: both re-made if a crash lost them."""
        epoch = record["epoch"] + 1
        if epoch % self.cfg.save_freq == 0 or epoch == self.cfg.epochs:
            self._save(os.path.join(self.cfg.output_dir, f"checkpoint-{epoch}.pth"))
        self.logger.epoch(record)

    def _repair_outputs(self) -> None:
        """Rewind log.txt to the checkpoint, and re-make what a crash after the commit point lost."""
        state = self.state
        if not dist.is_main() or not self.own_run:
            return
        self.logger.rewind(state.epoch)  # lines past the checkpoint (resumed from an older one)
        if state.epoch_step or state.record is None:
            return
        epoch = state.epoch
        numbered = os.path.join(self.cfg.output_dir, f"checkpoint-{epoch}.pth")
        due = epoch % self.cfg.save_freq == 0 or epoch == self.cfg.epochs
        if due and not os.path.isfile(numbered) and os.path.isfile(self.last_path):
            print(f"re-writing {numbered}, lost after the run saved {self.last_path}")
            save_checkpoint(torch.load(self.last_path, map_location="cpu", weights_only=True), numbered)
        if self.logger.last_epoch() < state.record["epoch"]:
            self.logger.epoch(state.record)

    def _exit_stopped(self, stop: StopRequest, what: str) -> None:
        """A stopped run exits non-zero (128 + signal, as shells do): `a && b` must not go on."""
        print(f"{stop.signal_name}: {what}; saved {self.last_path}. Rerun the same command to continue.")
        stop.restore()
        self.logger.close()
        dist.barrier()
        sys.exit(128 + stop.signal_number)
