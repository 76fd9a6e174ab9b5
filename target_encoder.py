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
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from models_mae import MAEEncoder, masked_mse

TARGETS = ("pixel", "mae_k", "ema")
EMA_EVERY = ("epoch", "step")


def pixel_target(patches: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """(N, L, K) patchified pixels -> regression target; per-patch normalised if asked (MAE)."""
    if not norm_pix_loss:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1.0e-6) ** 0.5


def _tensors(module: nn.Module) -> list:
    """Floating-point parameters and buffers in a fixed order (the order state_dict uses)."""
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


class TargetEncoder:
    """Schedules the target and owns the frozen target network.

    Call order per epoch: `on_epoch_start(e, online)`, then per step `loss(...)` and
    `on_step_end(e, online)`, then `on_epoch_end(e, online)`. `online` is always the
    unwrapped online `MAEEncoder` (never a DDP or compiled wrapper), so every rank
    updates from identical weights.
    """

    def __init__(self, target: str = "pixel", k: int = 10, tau: float = 0.995, wse: int = 20,
                 ema_every: str = "epoch", norm_pix_loss: bool = False):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
        if ema_every not in EMA_EVERY:
            raise ValueError(f"ema_every must be one of {EMA_EVERY}, got {ema_every!r}")
        self.target, self.k, self.tau, self.wse = target, k, tau, wse
        self.ema_every, self.norm_pix_loss = ema_every, norm_pix_loss
        self.encoder: Optional[MAEEncoder] = None

    # ---- schedule -------------------------------------------------------------------------
    @property
    def switch_epoch(self) -> Optional[int]:
        """First epoch that regresses features (None for pixel)."""
        return {"pixel": None, "mae_k": self.k, "ema": self.wse}[self.target]

    def uses_features(self, epoch: int) -> bool:
        return self.switch_epoch is not None and epoch >= self.switch_epoch

    def heads(self, epoch: int) -> Tuple[str, ...]:
        """The decoder heads the loss needs at this epoch."""
        return ("feature",) if self.uses_features(epoch) else ("pixel",)

    def describe(self, epoch: int) -> Dict[str, object]:
        """What this epoch regresses, for the log line."""
        info: Dict[str, object] = {"target": self.target,
                                   "regress": "feature" if self.uses_features(epoch) else "pixel"}
        if self.target == "mae_k":
            info["k"] = self.k
        elif self.target == "ema":
            info.update(tau=self.tau, wse=self.wse, ema_every=self.ema_every)
        return info

    # ---- updates ----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, online: MAEEncoder) -> bool:
        """Hard-copy the online encoder when the schedule says so. Returns True if it did."""
        refresh = (
            (self.target == "mae_k" and epoch >= self.k and epoch % self.k == 0)
            or (self.target == "ema" and epoch == self.wse))
        if refresh:
            self.copy_from(online)
        if self.uses_features(epoch) and self.encoder is None:
            # Only reachable by resuming from a checkpoint that lost its target encoder.
            raise RuntimeError(f"epoch {epoch} needs a target encoder but none was restored")
        return refresh

    def on_step_end(self, epoch: int, online: MAEEncoder) -> None:
        if self.target == "ema" and self.ema_every == "step" and self.uses_features(epoch):
            self.ema_update(online)

    def on_epoch_end(self, epoch: int, online: MAEEncoder) -> None:
        if self.target == "ema" and self.ema_every == "epoch" and self.uses_features(epoch):
            self.ema_update(online)

    @torch.no_grad()
    def copy_from(self, online: MAEEncoder) -> None:
        """target <- online, exactly."""
        if self.encoder is None:
            self.encoder = copy.deepcopy(online)
            for p in self.encoder.parameters():
                p.requires_grad_(False)
                p.grad = None  # deepcopy carries .grad along; the target must never hold one
            self.encoder.eval()
        else:
            torch._foreach_copy_(_tensors(self.encoder), _tensors(online))

    @torch.no_grad()
    def ema_update(self, online: MAEEncoder) -> None:
        """target <- tau * target + (1 - tau) * online, one fused op over all tensors."""
        assert self.encoder is not None
        torch._foreach_lerp_(_tensors(self.encoder), _tensors(online), 1.0 - self.tau)

    # ---- targets and loss ---------------------------------------------------------------------
    @torch.no_grad()
    def feature_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) full unmasked images -> (N, L, D) target features, cls dropped.

        no_grad rather than inference_mode: the result is saved by the loss's backward,
        which inference tensors may not be.
        """
        assert self.encoder is not None
        self.encoder.eval()
        return self.encoder.forward_features(imgs)[:, 1:, :]

    def loss(self, model: nn.Module, imgs: torch.Tensor, preds: Dict[str, torch.Tensor],
             mask: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Masked MSE between the heads' predictions and this epoch's target.

        Args:
            model: the unwrapped MaskedAutoencoderViT (for patchify).
            imgs: (N, C, H, W), the same augmented tensor the online model saw.
            preds: output of the model for `self.heads(epoch)`.
            mask: (N, L), 1 is remove.
        Returns:
            loss (scalar) and detached device-side statistics for logging (no host sync).
        """
        if self.uses_features(epoch):
            pred, tgt = preds["feature"], self.feature_target(imgs)
        else:
            pred, tgt = preds["pixel"], pixel_target(model.patchify(imgs), self.norm_pix_loss)
        loss = masked_mse(pred, tgt, mask)
        # Spread of targets and predictions across tokens: a collapsing target shows here first.
        stats = {"target_std": tgt.detach().float().std(dim=(0, 1)).mean(),
                 "pred_std": pred.detach().float().std(dim=(0, 1)).mean()}
        return loss, stats

    @torch.no_grad()
    def checksum(self) -> torch.Tensor:
        """A float64 fingerprint of the target weights (0 when there is none), for rank checks."""
        if self.encoder is None:
            return torch.zeros((), dtype=torch.float64)
        return sum(t.double().sum() * (i + 1) for i, t in enumerate(_tensors(self.encoder))).cpu()

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        return None if self.encoder is None else self.encoder.state_dict()

    def load_state_dict(self, state: Optional[Dict[str, torch.Tensor]], online: MAEEncoder) -> None:
        """Restore the target; `online` provides the architecture to copy it into."""
        if state is None:
            self.encoder = None
            return
        self.copy_from(online)
        self.encoder.load_state_dict(state)


def build_target(cfg) -> TargetEncoder:
    return TargetEncoder(target=cfg.target, k=cfg.k, tau=cfg.tau, wse=cfg.wse,
                         ema_every=cfg.ema_every, norm_pix_loss=cfg.norm_pix_loss)
