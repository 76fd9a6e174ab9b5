"""Everything about the reconstruction target: which one is used when, and the target encoder.

Three targets (`--target`):
    pixel: plain MAE, the decoder regresses normalised pixels of removed patches; no
           target encoder ever exists.
    mae_k: epochs [0, K) regress pixels; at the start of every epoch e >= K with e % K == 0
           the target encoder becomes an exact copy of the online encoder, frozen in between.
    ema:   epochs [0, WSE) regress pixels; at the start of epoch WSE the target encoder is a
           copy of the online encoder, then after every epoch (or every optimizer step with
           ema_every="step") target = tau * target + (1 - tau) * online.

The target encoder is a frozen module outside the optimizer and outside any DDP wrapper.
It sees the full, unmasked, identically augmented image in eval mode without autograd,
and its target is the last block after the final norm with the cls token dropped:
(N, L, D), token i from patch i, regressed by the feature head on removed patches only.
"""
import copy
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_mae import MAEEncoder, masked_mse

TARGETS = ("pixel", "mae_k", "ema", "dual")
EMA_EVERY = ("epoch", "step")
TARGET_NORMS = ("none", "layernorm", "instancenorm")


def pixel_target(patches: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """(N, L, K) patchified pixels -> regression target; per-patch normalised if asked (MAE)."""
    if not norm_pix_loss:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1.0e-6) ** 0.5


def cosine_tau(tau: float, tau_end: Optional[float], progress: float) -> float:
    """EMA decay annealed from `tau` (progress 0) to `tau_end` (progress 1) on a half cosine
    (BYOL, DINO); constant when tau_end is None. A pure function: resume stays exact."""
    if tau_end is None:
        return tau
    p = min(max(progress, 0.0), 1.0)
    return tau_end - (tau_end - tau) * (math.cos(math.pi * p) + 1) / 2


def _tensors(module: nn.Module) -> list:
    """Floating-point parameters and buffers in a fixed order (the order state_dict uses)."""
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


def _frozen_copy(online: MAEEncoder) -> MAEEncoder:
    enc = copy.deepcopy(online)
    for p in enc.parameters():
        p.requires_grad_(False)
        p.grad = None  # deepcopy carries .grad along; a target must never hold one
    return enc.eval()


class TargetEncoder:
    """Schedules the target and owns the frozen target network(s).

    Call order per epoch: `on_epoch_start(e, online)`, then per step `loss(...)` and
    `on_step_end(e, online, step)`, then `on_epoch_end(e, online)`. `online` is always the
    unwrapped online `MAEEncoder` (never a DDP or compiled wrapper), so every rank
    updates from identical weights.

    Options beyond the report (defaults reproduce it):
        tau_end: anneal tau to tau_end on a cosine over training (per step or per epoch).
        target_layers, target_norm, target_prenorm: the target is the mean of the top
            `target_layers` block outputs, each taken after the final norm (or before it with
            target_prenorm), each instance-normalised over tokens with target_norm=instancenorm,
            the mean layer-normalised with target_norm=layernorm; all parameter-free.
        pixel_weight, feature_ramp: after the switch, loss = ramp * L_feature + pixel_weight *
            L_pixel, ramp rising linearly to 1 over feature_ramp epochs (BootMAE).
        dual (target): the EMA target plus a snapshot refreshed every K epochs from the switch
            epoch WSE on, loss = L_ema + slow_lambda * L_snapshot, one online forward pass.
    """

    def __init__(self, target: str = "pixel", k: int = 10, tau: float = 0.995, wse: int = 20,
                 ema_every: str = "epoch", norm_pix_loss: bool = False, tau_end: Optional[float] = None,
                 epochs: int = 1, steps_per_epoch: int = 1, target_layers: int = 1,
                 target_norm: str = "none", target_prenorm: bool = False, pixel_weight: float = 0.0,
                 feature_ramp: int = 0, slow_lambda: float = 0.2):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
        if ema_every not in EMA_EVERY:
            raise ValueError(f"ema_every must be one of {EMA_EVERY}, got {ema_every!r}")
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {target_norm!r}")
        self.target, self.k, self.tau, self.wse = target, k, tau, wse
        self.ema_every, self.norm_pix_loss, self.tau_end = ema_every, norm_pix_loss, tau_end
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.target_layers, self.target_norm, self.target_prenorm = target_layers, target_norm, target_prenorm
        self.pixel_weight, self.feature_ramp, self.slow_lambda = pixel_weight, feature_ramp, slow_lambda
        self.encoder: Optional[MAEEncoder] = None  # mae_k snapshot, or the EMA (ema, dual)
        self.slow: Optional[MAEEncoder] = None     # dual only: the every-K snapshot

    # ---- schedule -------------------------------------------------------------------------
    @property
    def switch_epoch(self) -> Optional[int]:
        """First epoch that regresses features (None for pixel)."""
        return {"pixel": None, "mae_k": self.k, "ema": self.wse, "dual": self.wse}[self.target]

    @property
    def uses_ema(self) -> bool:
        return self.target in ("ema", "dual")

    def uses_features(self, epoch: int) -> bool:
        return self.switch_epoch is not None and epoch >= self.switch_epoch

    def heads(self, epoch: int) -> Tuple[str, ...]:
        """The decoder heads the loss needs at this epoch."""
        if not self.uses_features(epoch):
            return ("pixel",)
        return ("feature", "pixel") if self.pixel_weight > 0 else ("feature",)

    def feature_weight(self, epoch: int) -> float:
        """Ramp of the feature loss after the switch: 1/R, 2/R, ..., 1 over feature_ramp epochs."""
        if self.feature_ramp <= 0:
            return 1.0
        return min(1.0, (epoch - self.switch_epoch + 1) / self.feature_ramp)

    def tau_at(self, epoch: int, step: int) -> float:
        """The EMA decay used by the update after `step` (global, 1-based) of `epoch`."""
        if self.ema_every == "step":
            progress = step / max(self.epochs * self.steps_per_epoch, 1)
        else:
            progress = (epoch + 1) / max(self.epochs, 1)
        return cosine_tau(self.tau, self.tau_end, progress)

    def describe(self, epoch: int) -> Dict[str, object]:
        """What this epoch regresses, for the log line."""
        info: Dict[str, object] = {"target": self.target,
                                   "regress": "feature" if self.uses_features(epoch) else "pixel"}
        if self.target in ("mae_k", "dual"):
            info["k"] = self.k
        if self.uses_ema:
            info.update(tau=self.tau_at(epoch, (epoch + 1) * self.steps_per_epoch), wse=self.wse,
                        ema_every=self.ema_every)
        if self.uses_features(epoch) and (self.pixel_weight > 0 or self.feature_ramp > 0):
            info.update(feature_weight=self.feature_weight(epoch), pixel_weight=self.pixel_weight)
        return info

    # ---- updates ----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, online: MAEEncoder) -> bool:
        """Hard-copy the online encoder when the schedule says so. Returns True if it did."""
        refresh = ((self.target == "mae_k" and epoch >= self.k and epoch % self.k == 0)
                   or (self.uses_ema and epoch == self.wse))
        if refresh:
            self.encoder = self._copy(self.encoder, online)
        slow_refresh = (self.target == "dual" and epoch >= self.wse and (epoch - self.wse) % self.k == 0)
        if slow_refresh:
            self.slow = self._copy(self.slow, online)
        if self.uses_features(epoch) and (self.encoder is None or (self.target == "dual" and self.slow is None)):
            # Only reachable by resuming from a checkpoint that lost its target encoder.
            raise RuntimeError(f"epoch {epoch} needs a target encoder but none was restored")
        return refresh or slow_refresh

    def on_step_end(self, epoch: int, online: MAEEncoder, step: int = 0) -> None:
        if self.uses_ema and self.ema_every == "step" and self.uses_features(epoch):
            self.ema_update(online, self.tau_at(epoch, step))

    def on_epoch_end(self, epoch: int, online: MAEEncoder) -> None:
        if self.uses_ema and self.ema_every == "epoch" and self.uses_features(epoch):
            self.ema_update(online, self.tau_at(epoch, 0))

    @staticmethod
    @torch.no_grad()
    def _copy(dst: Optional[MAEEncoder], online: MAEEncoder) -> MAEEncoder:
        """dst <- online, exactly (a new frozen module the first time)."""
        if dst is None:
            return _frozen_copy(online)
        torch._foreach_copy_(_tensors(dst), _tensors(online))
        return dst

    def copy_from(self, online: MAEEncoder) -> None:
        """target <- online, exactly."""
        self.encoder = self._copy(self.encoder, online)

    @torch.no_grad()
    def ema_update(self, online: MAEEncoder, tau: Optional[float] = None) -> None:
        """target <- tau * target + (1 - tau) * online, one fused op over all tensors."""
        assert self.encoder is not None
        tau = self.tau if tau is None else tau
        torch._foreach_lerp_(_tensors(self.encoder), _tensors(online), 1.0 - tau)

    # ---- targets and loss ---------------------------------------------------------------------
    @torch.no_grad()
    def feature_target(self, imgs: torch.Tensor, encoder: Optional[MAEEncoder] = None) -> torch.Tensor:
        """(N, C, H, W) full unmasked images -> (N, L, D) target features, cls dropped.

        Default: last block after the final norm. no_grad rather than inference_mode: the
        result is saved by the loss's backward, which inference tensors may not be.
        """
        enc = self.encoder if encoder is None else encoder
        assert enc is not None
        enc.eval()
        if self.target_layers == 1 and not self.target_prenorm and self.target_norm == "none":
            return enc.forward_features(imgs)[:, 1:, :]
        outs = enc.forward_blocks(imgs)[-self.target_layers:]
        if not self.target_prenorm:
            outs = [enc.norm(o) for o in outs]
        outs = [o[:, 1:, :] for o in outs]
        if self.target_norm == "instancenorm":  # each channel over the tokens (data2vec)
            outs = [F.instance_norm(o.transpose(1, 2).float()).transpose(1, 2) for o in outs]
        tgt = torch.stack(outs).mean(dim=0)
        if self.target_norm == "layernorm":  # each token over channels, no affine
            tgt = F.layer_norm(tgt.float(), tgt.shape[-1:])
        return tgt

    def loss(self, model: nn.Module, imgs: torch.Tensor, preds: Dict[str, torch.Tensor],
             mask: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Masked MSE between the heads' predictions and this epoch's target(s).

        Args:
            model: the unwrapped MaskedAutoencoderViT (for patchify).
            imgs: (N, C, H, W), the same augmented tensor the online model saw.
            preds: output of the model for `self.heads(epoch)`.
            mask: (N, L), 1 is remove.
        Returns:
            loss (scalar) and detached device-side statistics for logging (no host sync).
        """
        if not self.uses_features(epoch):
            pred, tgt = preds["pixel"], pixel_target(model.patchify(imgs), self.norm_pix_loss)
            loss = masked_mse(pred, tgt, mask)
        else:
            pred, tgt = preds["feature"], self.feature_target(imgs)
            loss = masked_mse(pred, tgt, mask)
            if self.target == "dual":  # the same prediction also regresses the slow snapshot
                loss = loss + self.slow_lambda * masked_mse(pred, self.feature_target(imgs, self.slow), mask)
            loss = self.feature_weight(epoch) * loss
            if self.pixel_weight > 0:
                pix = pixel_target(model.patchify(imgs), self.norm_pix_loss)
                loss = loss + self.pixel_weight * masked_mse(preds["pixel"], pix, mask)
        # Spread of targets and predictions across tokens: a collapsing target shows here first.
        stats = {"target_std": tgt.detach().float().std(dim=(0, 1)).mean(),
                 "pred_std": pred.detach().float().std(dim=(0, 1)).mean()}
        return loss, stats

    @torch.no_grad()
    def checksum(self) -> torch.Tensor:
        """A float64 fingerprint of the target weights (0 when there is none), for rank checks."""
        total = torch.zeros((), dtype=torch.float64)
        for enc in (self.encoder, self.slow):
            if enc is not None:
                total += sum(t.double().sum() * (i + 1) for i, t in enumerate(_tensors(enc))).cpu()
        return total

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The target encoder (the EMA for dual), timm ViT key names; None before the switch."""
        return None if self.encoder is None else self.encoder.state_dict()

    def slow_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """dual only: the every-K snapshot."""
        return None if self.slow is None else self.slow.state_dict()

    def load_state_dict(self, state: Optional[Dict[str, torch.Tensor]], online: MAEEncoder,
                        slow: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Restore the target(s); `online` provides the architecture to copy them into."""
        self.encoder = self.slow = None
        if state is not None:
            self.encoder = _frozen_copy(online)
            self.encoder.load_state_dict(state)
        if slow is not None:
            self.slow = _frozen_copy(online)
            self.slow.load_state_dict(slow)


def build_target(cfg, steps_per_epoch: int = 1) -> TargetEncoder:
    return TargetEncoder(target=cfg.target, k=cfg.k, tau=cfg.tau, wse=cfg.wse,
                         ema_every=cfg.ema_every, norm_pix_loss=cfg.norm_pix_loss, tau_end=cfg.tau_end,
                         epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                         target_layers=cfg.target_layers, target_norm=cfg.target_norm,
                         target_prenorm=cfg.target_prenorm, pixel_weight=cfg.pixel_weight,
                         feature_ramp=cfg.feature_ramp, slow_lambda=cfg.slow_lambda)
