"""The reconstruction target: what the decoder regresses at each epoch, and the target encoder.

One class per target kind, registered under its `--target` name in `TARGETS`:
    pixel:  plain MAE, the decoder regresses normalised pixels of removed patches; no target
            encoder ever exists.
    mae_k:  epochs [0, K) regress pixels; at the start of every epoch e >= K with e % K == 0
            the target encoder becomes an exact copy of the online encoder, frozen in between.
    ema:    epochs [0, WSE) regress pixels; at the start of epoch WSE the target encoder is a
            copy of the online encoder, then after every epoch (or every optimizer step with
            ema_every="step") target = tau * target + (1 - tau) * online.
    dual:   ema, plus a snapshot refreshed every K epochs from epoch WSE on;
            loss = L_ema + slow_lambda * L_snapshot, from one online forward pass.
    random: dBOT's first stage: from epoch 0 the features of a frozen copy of the randomly
            initialised online encoder, taken before any training and never updated.
    staged: dBOT's staged teachers: `random`, then a snapshot of the online encoder at epochs
            K, 2K, ...
    hog:    MaskFeat: histograms of oriented gradients of the full image, per patch; no teacher.
    teacher: a frozen encoder read from an encoder.safetensors this project exported (a
            previous stage, a stronger model), any width, from epoch 0.

Adding a target is one class plus one registry line, e.g. the EMA's features negated:

    @register_target("ema_negated")
    class NegatedEMATarget(EMATarget):
        def feature_target(self, imgs, encoder=None):
            return -super().feature_target(imgs, encoder)

The config accepts every registered name, the training loop calls only the hooks of `Target`,
and the checkpoint stores whatever `state_dict()` returns. A kind whose tokens have another
width than the encoder's says so in `feature_dim`: the feature head is sized from it.

A target encoder is a frozen module outside the optimizer and outside any DDP wrapper. It sees
the full, unmasked, identically augmented image in eval mode without autograd, and its target
is the last block after the final norm with the cls token dropped: (N, L, D), token i from
patch i, regressed by the feature head on removed patches only.
"""
import copy
import hashlib
import math
import os
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_arch import Arch
from models_mae import MAEEncoder, arch_of, masked_mse
from util.errors import UserError

EMA_EVERY = ("epoch", "step")
TARGET_NORMS = ("none", "layernorm", "instancenorm")
# The decoder heads (models_mae.MaskedAutoencoderViT.heads): what a target asks the model for.
PIXEL_HEAD, FEATURE_HEAD = "pixel", "feature"

TARGETS: Dict[str, Type["Target"]] = {}
# Options every kind with a feature phase reads (the `Target` docstring); pixel MAE reads none.
FEATURE_OPTIONS = ("target_layers", "target_norm", "target_prenorm", "pixel_weight", "feature_ramp",
                   "feature_decoder")
# Plain MAE and the report's method: what a quick benchmark times when not told which kinds.
HEADLINE_KINDS = ("pixel", "ema")


def register_target(name: str) -> Callable[[Type["Target"]], Type["Target"]]:
    """Class decorator: make a Target subclass available as `--target NAME`."""
    def register(cls: Type["Target"]) -> Type["Target"]:
        if name in TARGETS:
            raise ValueError(f"target {name!r} is already registered ({TARGETS[name].__name__})")
        cls.kind = name
        TARGETS[name] = cls
        return cls
    return register


def self_contained() -> Tuple[str, ...]:
    """The kinds that run on defaults alone (no file to pass): what benchmarks time by default."""
    return tuple(name for name, kind in TARGETS.items() if not kind.requires)


def build_target(cfg, steps_per_epoch: int = 1) -> "Target":
    """The target named by cfg.target, configured from cfg (a PretrainConfig); prints a note for
    each option the command set that cannot act on it."""
    if cfg.target not in TARGETS:
        raise UserError(f"unknown target {cfg.target!r}; choose from {', '.join(TARGETS)}")
    target = TARGETS[cfg.target](cfg, steps_per_epoch)
    for note in target.notes(cfg):
        print(f"note: {note}")
    return target


def per_mask(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image targets (N, L, K) -> (M*N, L, K) for a mask of M*N rows (--num_masks M): each
    image's target is computed once and shared by its M masked views (data2vec 2.0), in the
    model's batch order imgs.repeat(M, ...), i.e. view m of image i is row m*N + i."""
    m = mask.shape[0] // t.shape[0]
    return t if m == 1 else t.repeat(m, 1, 1)


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


# ---- frozen copies ------------------------------------------------------------------------------

def _tensors(module: nn.Module) -> list:
    """Floating-point parameters and buffers in a fixed order (the order state_dict uses)."""
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


def frozen_copy(online: MAEEncoder) -> MAEEncoder:
    """A new module equal to `online`: no grads, never trained, eval mode."""
    enc = copy.deepcopy(online)
    for p in enc.parameters():
        p.requires_grad_(False)
        p.grad = None  # deepcopy carries .grad along; a target must never hold one
    return enc.eval()


@torch.no_grad()
def hard_copy(dst: Optional[MAEEncoder], online: MAEEncoder) -> MAEEncoder:
    """dst <- online, exactly (a new frozen module the first time)."""
    if dst is None:
        return frozen_copy(online)
    torch._foreach_copy_(_tensors(dst), _tensors(online))
    return dst


def _restored(state: Optional[Dict[str, torch.Tensor]], online: MAEEncoder) -> Optional[MAEEncoder]:
    """A checkpoint's encoder state_dict -> a frozen encoder shaped like `online` (None stays None)."""
    if state is None:
        return None
    enc = frozen_copy(online)
    enc.load_state_dict(state)
    return enc


# ---- the interface, and what every kind shares -------------------------------------------------

class Target:
    """Schedules the target and owns the frozen target network(s).

    Call order per epoch: `on_epoch_start(e, online)`, then per step `loss(...)` and
    `on_step_end(e, online, step)`, then `on_epoch_end(e, online)`. `online` is always the
    unwrapped online `MAEEncoder` (never a DDP or compiled wrapper), so every rank updates from
    identical weights.

    A kind sets `switch_epoch` (first epoch regressing features; None: never) and overrides
    what it needs: `refresh` (hard copies at an epoch's start), `on_step_end`, `on_epoch_end`,
    `feature_target`, `feature_loss`, `schedule_info`, `check_config`, and for more than one
    teacher `teachers`, `state_dict`, `load_state_dict`.

    Options every kind shares (defaults reproduce the report):
        target_layers, target_norm, target_prenorm: the target is the mean of the top
            `target_layers` block outputs, each taken after the final norm (or before it with
            target_prenorm), each instance-normalised over tokens with target_norm=instancenorm,
            the mean layer-normalised with target_norm=layernorm; all parameter-free.
        pixel_weight, feature_ramp: after the switch, loss = ramp * L_feature + pixel_weight *
            L_pixel, ramp rising linearly to 1 over feature_ramp epochs (BootMAE).
    """
    kind: str = ""                      # the registry name, set by register_target
    options: Tuple[str, ...] = ()       # the config fields this kind reads beyond the shared ones
    switch_epoch: Optional[int] = None  # first epoch regressing features; None: never
    refreshes_later = True              # refreshes a teacher after epoch 0 (what --stage_reset acts on)
    requires: Tuple[str, ...] = ()      # config keys a run of this kind must set (no default works)

    def __init__(self, cfg, steps_per_epoch: int = 1):
        if cfg.target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {cfg.target_norm!r}")
        self.norm_pix_loss, self.epochs, self.steps_per_epoch = cfg.norm_pix_loss, cfg.epochs, steps_per_epoch
        self.target_layers, self.target_norm = cfg.target_layers, cfg.target_norm
        self.target_prenorm = cfg.target_prenorm
        self.pixel_weight, self.feature_ramp = cfg.pixel_weight, cfg.feature_ramp
        self.encoder: Optional[MAEEncoder] = None  # the target encoder, once there is one
        self.last_target: Optional[torch.Tensor] = None  # the last step's targets, for `health`

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise UserError (one line) for a config this kind cannot run: e.g. a schedule whose
        teacher would arrive after the last epoch (the run would be pixel MAE under another name)."""

    def reads(self) -> Tuple[str, ...]:
        """The target options that act on this run: the kind's own, the feature options once
        there is a feature phase, stage_reset where a teacher is refreshed after epoch 0."""
        shared = FEATURE_OPTIONS if self.switch_epoch is not None else ()
        return self.options + shared + (("stage_reset",) if self.refreshes_later else ())

    def notes(self, cfg) -> Tuple[str, ...]:
        """One line for each option the command set (cfg.given) that cannot act on this run."""
        every = {o for kind in TARGETS.values() for o in kind.options} | set(FEATURE_OPTIONS) | {"stage_reset"}
        unused = sorted(o for o in every - set(self.reads()) if o in cfg.given)
        out = [f"--target {self.kind} does not read {', '.join(unused)}: ignored"] if unused else []
        phase = self.epochs - (self.switch_epoch or 0)
        if self.switch_epoch is not None and "feature_ramp" in cfg.given and self.feature_ramp > phase:
            out.append(f"feature_ramp {self.feature_ramp} is longer than the feature phase (epochs "
                       f"{self.switch_epoch}-{self.epochs - 1}): the feature loss weight ends at "
                       f"{self.feature_weight(self.epochs - 1):.2g}, not 1")
        return tuple(out)

    @classmethod
    def frozen_archs(cls, cfg, online: Arch) -> Tuple[Arch, ...]:
        """The architectures of the frozen encoders a run of this kind holds (util/memory.py's
        estimate): one copy of the online encoder `online` unless the kind says otherwise."""
        return (online,)

    def feature_dim(self, arch: Arch, in_chans: int) -> int:
        """Width of one target token (the feature head's output) for the online model `arch` on
        `in_chans`-channel images: the encoder's own width for its copies."""
        return arch.embed_dim

    # ---- schedule ---------------------------------------------------------------------------
    def uses_features(self, epoch: int) -> bool:
        return self.switch_epoch is not None and epoch >= self.switch_epoch

    def heads(self, epoch: int) -> Tuple[str, ...]:
        """The decoder heads the loss needs at this epoch."""
        if not self.uses_features(epoch):
            return (PIXEL_HEAD,)
        return (FEATURE_HEAD, PIXEL_HEAD) if self.pixel_weight > 0 else (FEATURE_HEAD,)

    def feature_weight(self, epoch: int) -> float:
        """Ramp of the feature loss after the switch: 1/R, 2/R, ..., 1 over feature_ramp epochs."""
        if self.feature_ramp <= 0:
            return 1.0
        return min(1.0, (epoch - self.switch_epoch + 1) / self.feature_ramp)

    def schedule_info(self, epoch: int) -> Dict[str, Any]:
        """This kind's schedule parameters for the log line."""
        return {}

    def describe(self, epoch: int) -> Dict[str, Any]:
        """What this epoch regresses, for the log line."""
        features = self.uses_features(epoch)
        info = {"target": self.kind, "regress": FEATURE_HEAD if features else PIXEL_HEAD,
                **self.schedule_info(epoch)}
        if features and (self.pixel_weight > 0 or self.feature_ramp > 0):
            info.update(feature_weight=self.feature_weight(epoch), pixel_weight=self.pixel_weight)
        return info

    def health(self) -> Dict[str, float]:
        """Collapse signals of the last batch's regression targets (pixels or features), for the
        epoch's log line; {} before any step."""
        return {} if self.last_target is None else token_health(self.last_target)

    # ---- updates ------------------------------------------------------------------------------
    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        """Hard copies due at the start of `epoch`; True if any happened."""
        return False

    def on_epoch_start(self, epoch: int, online: MAEEncoder) -> bool:
        """Refresh the target when the schedule says so. Returns True if it did."""
        refreshed = self.refresh(epoch, online)
        if self.uses_features(epoch) and any(t is None for t in self.teachers()):
            # Only reachable by resuming from a checkpoint that lost its target encoder.
            raise RuntimeError(f"epoch {epoch} needs a target encoder but none was restored")
        return refreshed

    def on_step_end(self, epoch: int, online: MAEEncoder, global_step: int = 0) -> None:
        """After each optimizer step (`global_step`: 1-based, over the whole run)."""

    def on_epoch_end(self, epoch: int, online: MAEEncoder) -> None:
        """After the last step of an epoch."""

    # ---- targets and loss ---------------------------------------------------------------------
    @torch.no_grad()
    def feature_target(self, imgs: torch.Tensor, encoder: Optional[MAEEncoder] = None) -> torch.Tensor:
        """(N, C, H, W) full unmasked images -> (N, L, D) target features, cls dropped.

        `encoder`: the teacher (default: self.encoder). no_grad rather than inference_mode:
        the result is saved by the loss's backward, which inference tensors may not be.
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

    def feature_loss(self, pred: torch.Tensor, tgt: torch.Tensor, imgs: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """The feature head's loss given this step's feature target (before ramp and pixel loss)."""
        return masked_mse(pred, tgt, mask)

    def loss(self, model: nn.Module, imgs: torch.Tensor, preds: Dict[str, torch.Tensor],
             mask: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Masked MSE between the heads' predictions and this epoch's target(s).

        Args:
            model: the unwrapped MaskedAutoencoderViT (for patchify).
            imgs: (N, C, H, W), the augmented images the online model saw (M times each with
                --num_masks M: the targets are computed once per image, see `per_mask`).
            preds: output of the model for `self.heads(epoch)`, (M*N, L, K) each.
            mask: (M*N, L), 1 is remove.
        Returns:
            loss (scalar) and detached device-side statistics for logging (no host sync).
        """
        if not self.uses_features(epoch):
            pred, tgt = preds[PIXEL_HEAD], per_mask(pixel_target(model.patchify(imgs), self.norm_pix_loss), mask)
            loss = masked_mse(pred, tgt, mask)
        else:
            pred, tgt = preds[FEATURE_HEAD], per_mask(self.feature_target(imgs), mask)
            loss = self.feature_weight(epoch) * self.feature_loss(pred, tgt, imgs, mask)
            if self.pixel_weight > 0:
                pix = per_mask(pixel_target(model.patchify(imgs), self.norm_pix_loss), mask)
                loss = loss + self.pixel_weight * masked_mse(preds[PIXEL_HEAD], pix, mask)
        self.last_target = tgt.detach()  # for `health` at the epoch's end (one reference, no copy)
        # Spread of targets and predictions across tokens: a collapsing target shows here first.
        stats = {"target_std": tgt.detach().float().std(dim=(0, 1)).mean(),
                 "pred_std": pred.detach().float().std(dim=(0, 1)).mean()}
        return loss, stats

    # ---- state ----------------------------------------------------------------------------------
    def teachers(self) -> Tuple[Optional[MAEEncoder], ...]:
        """Every frozen network the feature loss reads (None before it exists)."""
        return (self.encoder,)

    @torch.no_grad()
    def checksum(self) -> torch.Tensor:
        """A float64 fingerprint of the target weights (0 when there is none), for rank checks."""
        total = torch.zeros((), dtype=torch.float64)
        for enc in self.teachers():
            if enc is not None:
                total += sum(t.double().sum() * (i + 1) for i, t in enumerate(_tensors(enc))).cpu()
        return total

    def state_dict(self) -> Dict[str, Any]:
        """Checkpoint entries: "target", the target encoder's state_dict (timm ViT key names),
        None before it exists."""
        return {"target": None if self.encoder is None else self.encoder.state_dict()}

    def load_state_dict(self, ckpt: Dict[str, Any], online: MAEEncoder) -> None:
        """Restore from a whole checkpoint dict; `online` gives the architecture to copy into."""
        self.encoder = _restored(ckpt.get("target"), online)


@torch.no_grad()
def token_health(tokens: torch.Tensor) -> Dict[str, float]:
    """How many directions a batch of tokens spans. tokens: (N, L, D).

    target_erank: effective rank (Roy & Vetterli, 2007) of the centred (N*L, D) token matrix,
        exp of the entropy of its normalised singular values: D for isotropic tokens, 1 when
        all variation lies on one line. A slow collapse shows here before target_std falls.
    target_min_channel_std: the smallest per-channel std (0: a dead channel).
    """
    x = tokens.reshape(-1, tokens.shape[-1]).float()
    x = x - x.mean(dim=0)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    erank = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
    return {"target_erank": float(erank), "target_min_channel_std": float(x.std(dim=0).min())}


# ---- the kinds ----------------------------------------------------------------------------------

@register_target("pixel")
class PixelTarget(Target):
    """Plain MAE: pixels of removed patches, always; no target encoder."""
    refreshes_later = False

    @classmethod
    def frozen_archs(cls, cfg, online: Arch) -> Tuple[Arch, ...]:
        return ()


@register_target("mae_k")
class MAEKTarget(Target):
    """A snapshot of the online encoder, hard-copied at the start of epochs K, 2K, ...; pixels before K."""
    options = ("k",)

    def __init__(self, cfg, steps_per_epoch: int = 1):
        super().__init__(cfg, steps_per_epoch)
        self.k = self.switch_epoch = cfg.k

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.k >= cfg.epochs:
            raise UserError(f"k {cfg.k} must be below epochs {cfg.epochs}: --target {cfg.target} first copies its "
                            f"teacher at the start of epoch {cfg.k}, after the run ends")

    def schedule_info(self, epoch: int) -> Dict[str, Any]:
        return {"k": self.k}

    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        if epoch >= self.k and epoch % self.k == 0:
            self.encoder = hard_copy(self.encoder, online)
            return True
        return False


@register_target("ema")
class EMATarget(Target):
    """An exponential moving average of the online encoder, created at epoch WSE; pixels before.

    tau_end: anneal tau to tau_end on a cosine over training (per step or per epoch).
    """
    options = ("wse", "tau", "tau_end", "ema_every")

    def __init__(self, cfg, steps_per_epoch: int = 1):
        super().__init__(cfg, steps_per_epoch)
        if cfg.ema_every not in EMA_EVERY:
            raise ValueError(f"ema_every must be one of {EMA_EVERY}, got {cfg.ema_every!r}")
        self.tau, self.tau_end, self.ema_every = cfg.tau, cfg.tau_end, cfg.ema_every
        self.wse = self.switch_epoch = cfg.wse

    @classmethod
    def check_config(cls, cfg) -> None:
        if not 0 <= cfg.wse < cfg.epochs:
            raise UserError(f"wse must be in [0, epochs={cfg.epochs}), got {cfg.wse}")

    def tau_at(self, epoch: int, step: int) -> float:
        """The EMA decay used by the update after `step` (global, 1-based) of `epoch`."""
        if self.ema_every == "step":
            progress = step / max(self.epochs * self.steps_per_epoch, 1)
        else:
            progress = (epoch + 1) / max(self.epochs, 1)
        return cosine_tau(self.tau, self.tau_end, progress)

    def schedule_info(self, epoch: int) -> Dict[str, Any]:
        return {"tau": self.tau_at(epoch, (epoch + 1) * self.steps_per_epoch), "wse": self.wse,
                "ema_every": self.ema_every}

    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        if epoch == self.wse:
            self.encoder = hard_copy(self.encoder, online)
            return True
        return False

    @torch.no_grad()
    def ema_update(self, online: MAEEncoder, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, one fused op over all tensors."""
        torch._foreach_lerp_(_tensors(self.encoder), _tensors(online), 1.0 - tau)

    def on_step_end(self, epoch: int, online: MAEEncoder, global_step: int = 0) -> None:
        if self.ema_every == "step" and self.uses_features(epoch):
            self.ema_update(online, self.tau_at(epoch, global_step))

    def on_epoch_end(self, epoch: int, online: MAEEncoder) -> None:
        if self.ema_every == "epoch" and self.uses_features(epoch):
            self.ema_update(online, self.tau_at(epoch, 0))


@register_target("dual")
class DualTarget(EMATarget):
    """The EMA target plus a snapshot (`slow`) refreshed every K epochs from epoch WSE on:
    loss = L_ema + slow_lambda * L_snapshot, both regressed by the same prediction."""
    options = EMATarget.options + ("k", "slow_lambda")

    def __init__(self, cfg, steps_per_epoch: int = 1):
        super().__init__(cfg, steps_per_epoch)
        self.k, self.slow_lambda = cfg.k, cfg.slow_lambda
        self.slow: Optional[MAEEncoder] = None

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.k >= cfg.epochs:
            raise UserError(f"k {cfg.k} must be below epochs {cfg.epochs}: --target dual refreshes its snapshot "
                            f"every k epochs")

    def notes(self, cfg) -> Tuple[str, ...]:
        never = self.wse + self.k >= self.epochs
        return super().notes(cfg) + ((f"dual: the snapshot taken at epoch {self.wse} is never refreshed "
                                      f"(next at epoch {self.wse + self.k}, epochs {self.epochs})",) if never else ())

    def schedule_info(self, epoch: int) -> Dict[str, Any]:
        return {"k": self.k, **super().schedule_info(epoch)}

    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        ema = super().refresh(epoch, online)
        if epoch >= self.wse and (epoch - self.wse) % self.k == 0:
            self.slow = hard_copy(self.slow, online)
            return True
        return ema

    def feature_loss(self, pred, tgt, imgs, mask) -> torch.Tensor:
        slow = masked_mse(pred, per_mask(self.feature_target(imgs, self.slow), mask), mask)
        return super().feature_loss(pred, tgt, imgs, mask) + self.slow_lambda * slow

    def teachers(self) -> Tuple[Optional[MAEEncoder], ...]:
        return (self.encoder, self.slow)

    @classmethod
    def frozen_archs(cls, cfg, online: Arch) -> Tuple[Arch, ...]:
        return (online, online)

    def state_dict(self) -> Dict[str, Any]:
        """Also "target_slow": the every-K snapshot's state_dict (None before it exists)."""
        return {**super().state_dict(), "target_slow": None if self.slow is None else self.slow.state_dict()}

    def load_state_dict(self, ckpt: Dict[str, Any], online: MAEEncoder) -> None:
        super().load_state_dict(ckpt, online)
        self.slow = _restored(ckpt.get("target_slow"), online)


@register_target("random")
class RandomTarget(Target):
    """dBOT's first stage: regress, from epoch 0, the features of a frozen copy of the online
    encoder taken at the start of epoch 0, before any training (its random init), never updated."""
    switch_epoch = 0
    refreshes_later = False

    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        if epoch == 0:
            self.encoder = hard_copy(self.encoder, online)
            return True
        return False


@register_target("staged")
class StagedTarget(MAEKTarget):
    """dBOT's staged teachers: a frozen copy of the random-init encoder from epoch 0 (as `random`),
    replaced by a snapshot of the online encoder at epochs K, 2K, ... With --stage_reset the
    student restarts from a fresh initialisation at each new stage (engine_pretrain)."""

    def __init__(self, cfg, steps_per_epoch: int = 1):
        super().__init__(cfg, steps_per_epoch)
        self.switch_epoch = 0

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.k >= cfg.epochs:
            raise UserError(f"k {cfg.k} must be below epochs {cfg.epochs}: the second stage of --target staged "
                            f"starts at epoch {cfg.k}, after the run ends (one stage is --target random)")

    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        if epoch % self.k == 0:
            self.encoder = hard_copy(self.encoder, online)
            return True
        return False


# ---- targets that are not copies of the online encoder ------------------------------------------

HOG_BINS = 9  # orientation bins over [0, pi), as MaskFeat and Dalal & Triggs


@torch.no_grad()
def hog_features(imgs: torch.Tensor, patch: int, bins: int = HOG_BINS) -> torch.Tensor:
    """MaskFeat's target: (N, C, H, W) -> (N, L, C * 4 * bins), L = (H/patch) * (W/patch).

    Per colour channel: [-1, 0, 1] gradients, each pixel's magnitude split between its two
    nearest unsigned-orientation bins, summed over cells of (patch/2)^2 pixels, each cell's
    histogram L2-normalised. Cell layout: 2 x 2 cells per patch, so patch 16 gets MaskFeat's
    8 x 8 cells and CIFAR's patch 4 gets 2 x 2 ones: every patch carries the same 4-cell
    layout (where its edges lie inside the patch), and a cell never straddles two patches.
    Computed in float32 (outside autocast): the orientations are the target.
    """
    n, c, h, w = imgs.shape
    cell = patch // 2
    with torch.autocast(imgs.device.type, enabled=False):
        x = imgs.float().reshape(n * c, 1, h, w)
        k = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
        gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))
        gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))
        mag = torch.hypot(gx, gy)
        pos = torch.atan2(gy, gx).remainder(math.pi) * (bins / math.pi)  # in [0, bins]
        low = pos.floor()
        frac = pos - low
        low = low.long() % bins
        hist = torch.zeros(n * c, bins, h, w, device=x.device)
        hist.scatter_add_(1, low, mag * (1 - frac)).scatter_add_(1, (low + 1) % bins, mag * frac)
        hist = F.normalize(F.avg_pool2d(hist, cell), dim=1)  # (N*C, bins, H/cell, W/cell), per cell
        gh, gw = h // patch, w // patch
        hist = hist.reshape(n, c, bins, gh, 2, gw, 2).permute(0, 3, 5, 1, 4, 6, 2)
        return hist.reshape(n, gh * gw, c * 4 * bins)


@register_target("hog")
class HOGTarget(Target):
    """MaskFeat (Wei et al. 2022): regress, from epoch 0, the histograms of oriented gradients of
    the removed patches (`hog_features`), computed on the fly on the device; no teacher network."""
    switch_epoch = 0
    refreshes_later = False

    @classmethod
    def check_config(cls, cfg) -> None:
        patch = arch_of(cfg.model).patch_size
        if patch % 2:
            raise UserError(f"--target hog splits each patch into 2 x 2 cells: {cfg.model}'s patch {patch} is odd")

    def __init__(self, cfg, steps_per_epoch: int = 1):
        super().__init__(cfg, steps_per_epoch)
        self.patch = arch_of(cfg.model).patch_size

    def reads(self) -> Tuple[str, ...]:
        return ("pixel_weight", "feature_ramp", "feature_decoder")  # no encoder: no layers to pick

    @classmethod
    def frozen_archs(cls, cfg, online: Arch) -> Tuple[Arch, ...]:
        return ()

    def feature_dim(self, arch: Arch, in_chans: int) -> int:
        return in_chans * 4 * HOG_BINS

    def teachers(self) -> Tuple[Optional[MAEEncoder], ...]:
        return ()

    def feature_target(self, imgs: torch.Tensor, encoder: Optional[MAEEncoder] = None) -> torch.Tensor:
        return hog_features(imgs, self.patch)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _teacher_file(path: str, model: str, input_size: int):
    """(architecture, metadata, safe_open handle) of an encoder.safetensors of export_weights.py,
    checked against the student: the teacher's patch on `input_size` images must give the
    student's grid. UserError (one line) otherwise."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise UserError(f"--teacher {path!r}: no such file (an encoder.safetensors written by export_weights.py)")
    try:
        f = safe_open(path, "pt")
        meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--teacher {path}: not a readable safetensors file ({str(e).splitlines()[0]})")
    try:
        arch = arch_of(meta["model"])
    except KeyError:
        raise UserError(f"--teacher {path}: its metadata names no architecture this project knows "
                        f"(model {meta.get('model')!r}); export it with export_weights.py")
    grid, student = input_size // arch.patch_size, input_size // arch_of(model).patch_size
    if input_size % arch.patch_size or grid != student:
        raise UserError(f"--teacher {path}: its patch {arch.patch_size} on {input_size}x{input_size} images gives "
                        f"a {grid}x{grid} grid, {model}'s is {student}x{student}: the targets would not "
                        f"line up with the patches")
    return arch, meta, f


def load_teacher(path: str, model: str, input_size: int) -> MAEEncoder:
    """The frozen teacher encoder of `path` (see `_teacher_file`) at `input_size`: position
    embeddings resampled when it was trained at another size (models_vit.resize_pos_embed)."""
    from models_vit import resize_pos_embed
    arch, meta, f = _teacher_file(path, model, input_size)
    state = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):  # no init drawn: the student's init is the same as without a teacher
        enc = MAEEncoder(img_size=input_size, in_chans=state["patch_embed.proj.weight"].shape[1],
                         **arch.encoder_kwargs())
    try:
        enc.load_state_dict(resize_pos_embed(state, enc), assign=True)
    except RuntimeError as e:
        raise UserError(f"--teacher {path}: does not load as {meta['model']} ({str(e).splitlines()[0]})")
    return frozen_copy(enc)


@register_target("teacher")
class TeacherTarget(Target):
    """A frozen encoder from a file (--teacher PATH: an encoder.safetensors of export_weights.py,
    any width, any size on the same patch grid), regressed from epoch 0 with the shared options
    (target_layers, target_norm, ...): dBOT's distillation from a previous stage, MaskDistill's
    from a stronger model. The checkpoint keeps the file's sha256, not its weights: a resume
    refuses a file that changed."""
    options = requires = ("teacher",)
    switch_epoch = 0
    refreshes_later = False

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.teacher:
            raise UserError("--target teacher needs --teacher PATH (an encoder.safetensors written by export_weights.py)")
        _teacher_file(cfg.teacher, cfg.model, cfg.input_size)  # its metadata only: before any work

    @classmethod
    def frozen_archs(cls, cfg, online: Arch) -> Tuple[Arch, ...]:
        return (_teacher_file(cfg.teacher, cfg.model, cfg.input_size)[0],)

    def __init__(self, cfg, steps_per_epoch: int = 1):
        super().__init__(cfg, steps_per_epoch)
        self.path, self.sha256 = cfg.teacher, file_sha256(cfg.teacher)
        self.encoder = load_teacher(cfg.teacher, cfg.model, cfg.input_size)

    def feature_dim(self, arch: Arch, in_chans: int) -> int:
        if self.encoder.patch_embed.proj.in_channels != in_chans:
            raise UserError(f"--teacher {self.path}: trained on {self.encoder.patch_embed.proj.in_channels}-channel "
                            f"images, this run's have {in_chans}")
        return self.encoder.embed_dim

    def refresh(self, epoch: int, online: MAEEncoder) -> bool:
        self.encoder.to(online.cls_token.device)  # a no-op once there
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"target": None, "teacher_sha256": self.sha256}

    def load_state_dict(self, ckpt: Dict[str, Any], online: MAEEncoder) -> None:
        saved = ckpt.get("teacher_sha256")
        if saved and saved != self.sha256:
            raise UserError(f"--teacher {self.path}: not the file this run was trained with (sha256 "
                            f"{self.sha256[:12]}..., the checkpoint's {saved[:12]}...)")
