"""Pretraining: what one step and one epoch's end mean (the loop itself is util/trainer.py).

One step, top to bottom: draw the mask, encode the visible patches, decode, regress this
epoch's target (target_encoder.py decides which and computes it), backward, step, then let
the target update itself (per-step EMA). With --accum_iter K a step is one of K micro-batches
(util.trainer.Step): gradients add up over them and the optimizer and the target move on the
K-th only.
"""
import os
from typing import Callable, Dict, Optional

import torch
from timm.optim import param_groups_weight_decay

from dataio.datasets import image_channels, load_split
from dataio.loader import build_eval_loader
from engine_eval import extract_features, knn_accuracy
from models_mae import arch_of, create_model
from models_vit import pool_tokens
from target_encoder import build_target
from util import distributed as dist
from util.errors import UserError
from util.export import export_encoders
from util.runtime import autocast, compile_module, compiled_graphs, speed_options
from util.trainer import Step


class Pretraining:
    """The pretraining engine run by util.trainer.Run.

    Args:
        model: the unwrapped MaskedAutoencoderViT (checkpointed; its encoder feeds the target).
        forward: what runs the forward pass (`model`, its DDP wrapper or torch.compile'd twin).
        target: the reconstruction target (target_encoder.build_target).
        knn_monitor: optional `() -> accuracy` run at the end of an epoch when `knn_due(epoch)`.
    """
    kind = "pretrain"
    # One global draw of mask noise, identical on every rank, each rank keeping its rows:
    # N ranks x batch B then mask exactly as one process with batch N*B would.
    seed_per_rank = False
    stat_names: Dict[str, str] = {}

    def __init__(self, cfg, model: torch.nn.Module, forward: Callable, optimizer, target,
                 knn_monitor: Optional[Callable[[], float]] = None):
        self.cfg, self.model, self.forward, self.optimizer, self.target = cfg, model, forward, optimizer, target
        self.knn_monitor = knn_monitor
        self.device = next(model.parameters()).device
        self.refreshed = False

    def begin_epoch(self, epoch: int, resumed: bool) -> Dict[str, object]:
        """Hard copies (MAE-K refresh, EMA creation) happen at the start of an epoch; resumed
        inside an epoch, the first run already did them (and its checkpoint says whether)."""
        self.model.train()
        if not resumed:
            self.refreshed = self.target.on_epoch_start(epoch, self.model.encoder)
        if self.refreshed and self.cfg.stage_reset and epoch > 0:
            self.restart_student()
        self.heads = self.target.heads(epoch)
        if self.cfg.compile:
            self._compile_teachers()
        return {}

    def restart_student(self) -> None:
        """--stage_reset (dBOT): the teacher has just taken the student's weights; the student
        starts the new stage from a fresh initialisation and fresh optimizer moments. Drawn from
        the epoch's seeded global RNG: the same on every rank, and reproducible."""
        self.model.initialize_weights(self.cfg.feature_head_init)
        self.optimizer.state.clear()

    def _compile_teachers(self) -> None:
        """--compile: the target encoders' forward passes too (the other hot path of a step).
        Hard copies and EMA updates write into the same tensors, so one compile serves them all."""
        for enc in self.target.teachers():
            if enc is not None and not getattr(enc, "compiled", False):
                enc.forward_blocks = compile_module(enc.forward_blocks, self.device)
                enc.compiled = True

    def train_step(self, batch, step: Step) -> Optional[Dict[str, torch.Tensor]]:
        """imgs (N, C, H, W) on the device -> the batch's statistics, or None if skipped."""
        imgs, _ = batch
        cfg, world, m = self.cfg, dist.world(), self.cfg.num_masks
        # Drawn per micro-batch: K micro-batches of B mask as one batch of K*B would (one stream);
        # M masks per image (--num_masks): rows m*N..(m+1)*N-1 are the m-th view of the batch.
        noise = torch.rand(m, len(imgs) * world, self.model.encoder.num_patches,
                           device=imgs.device)[:, dist.rank()::world].flatten(0, 1)
        views = imgs.repeat(m, 1, 1, 1) if m > 1 else imgs  # the target pass still sees imgs once
        if step.first:  # an optimizer step starts from zero gradients
            self.optimizer.zero_grad(set_to_none=True)
        with step.no_sync(self.forward):  # DDP all-reduces once per optimizer step, on its last batch
            with autocast(imgs.device, cfg.precision):  # the target pass runs in the same precision
                preds, mask = self.forward(views, cfg.mask_ratio, self.heads, noise)
                loss, stats = self.target.loss(self.model, imgs, preds, mask, step.epoch)
            # 1/K: the K micro-batches' gradients sum to their mean. Backward even on a step to
            # skip: DDP's reducer expects every forward to get one.
            (loss * step.loss_scale).backward()
        if step.skip(loss):  # non-finite (--skip_nonfinite): its optimizer step is skipped too
            return None
        if step.update:  # the optimizer step's last batch: the weights move, then the target
            self.optimizer.step()
            self.target.on_step_end(step.epoch, self.model.encoder, step.global_step)
        return {"loss": loss.detach(), **stats}

    def end_epoch(self, epoch: int) -> Dict[str, object]:
        """Per-epoch EMA update, rank agreement, and what the log line says about the target."""
        self.target.on_epoch_end(epoch, self.model.encoder)
        if dist.world() > 1 and not dist.all_equal(self.target.checksum().to(self.device)):
            raise SystemExit(f"error: target encoders differ across ranks after epoch {epoch}")
        record = {**self.target.describe(epoch), **self.target.health(), "target_refreshed": self.refreshed}
        cfg = self.cfg
        if cfg.compile:  # new heads at the switch epoch mean new graphs: counted, so they show
            record["compiled_graphs"] = compiled_graphs()
        if self.knn_monitor is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            record["knn_acc"] = self.knn_monitor()
            self.model.train()
        return record

    def summary(self, record: Dict[str, object]) -> str:
        knn = f" knn {record['knn_acc']:.2f}" if "knn_acc" in record else ""
        return (f"loss {record['loss']:.4f} ({record['regress']}) lr {record['lr']:.2e} "
                f"{record['images_per_s']:.0f} img/s {record['seconds']:.1f}s{knn}")

    def state_dict(self) -> Dict[str, object]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self.target.state_dict(), "target_refreshed": self.refreshed}

    def load_state_dict(self, ckpt: Dict[str, object]) -> None:
        # read by a mid-epoch resume: the epoch's log line says what its start did
        self.refreshed = bool(ckpt.get("target_refreshed", False))
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.target.load_state_dict(ckpt, self.model.encoder)

    def finish(self) -> None:
        """The run's encoders as timm-ready safetensors beside the checkpoint (util/export.py)."""
        last = os.path.join(self.cfg.output_dir, "checkpoint-last.pth")
        if dist.is_main():  # Run.fit calls finish on every rank
            for path, call in export_encoders(last, self.cfg.output_dir).items():
                print(f"timm-ready weights: {path}\n  load: {call}")
        print(f"done: {last}")


# ---- building the engine of a run (main_pretrain.py; the benchmarks time the same) --------------

def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter, both heads included, from step 0. Weight decay on
    matrices only (official MAE), or on everything with --wd_norm_bias."""
    if cfg.wd_norm_bias:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    else:
        groups = param_groups_weight_decay(
            model, cfg.weight_decay,
            no_weight_decay_list=("encoder.cls_token", "mask_token", "feature_decoder.mask_token"))
    fused = next(model.parameters()).is_cuda  # one kernel for all tensors on CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def knn_monitor(model, cfg, device, mean, std, train_set) -> Callable[[], float]:
    """kNN accuracy of the online encoder's frozen features, train set -> test set.

    train_set: (images, labels, num_classes) as pretraining uses them (`load_split`); the test
    split is loaded once here rather than at every evaluation.
    """
    images, labels, num_classes = train_set
    sets = ((images, labels), load_split(cfg, train=False)[:2])

    def run() -> float:
        model.eval()
        encode = lambda x: pool_tokens(model.encoder.forward_features(x), cfg.knn_pool)  # noqa: E731
        (tr_f, tr_y), (te_f, te_y) = [extract_features(encode, build_eval_loader(cfg, x, y, device, mean, std))
                                      for x, y in sets]
        return knn_accuracy(tr_f, tr_y, te_f, te_y, num_classes, cfg.knn_k, cfg.knn_t)
    return run


def build_engine(cfg, device, train_set, mean, std, steps_per_epoch: int) -> Pretraining:
    """The model at cfg.input_size, its optimizer, target and kNN monitor. train_set: (images,
    labels, num_classes), images a uint8 array (N, H, W, C) or ImageFiles (`load_split`)."""
    in_chans = image_channels(train_set[0])
    target = build_target(cfg, steps_per_epoch=steps_per_epoch)
    model = create_model(cfg.model, img_size=cfg.input_size, in_chans=in_chans,
                         feature_head_init=cfg.feature_head_init, feature_decoder=cfg.feature_decoder,
                         feature_dim=target.feature_dim(arch_of(cfg.model), in_chans)).to(device)
    if cfg.target_layers > len(model.encoder.blocks):
        raise UserError(f"target_layers {cfg.target_layers} exceeds the encoder depth {len(model.encoder.blocks)}")
    forward = model
    if dist.world() > 1:
        # The head a phase does not use gets no gradient (pixel head after the switch, feature
        # head before it), hence find_unused_parameters. The target encoder stays outside DDP.
        forward = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    monitor = knn_monitor(model, cfg, device, mean, std, train_set) if cfg.knn_every and dist.is_main() else None
    return Pretraining(cfg, model, speed_options(forward, cfg, device), build_optimizer(model, cfg), target, monitor)
