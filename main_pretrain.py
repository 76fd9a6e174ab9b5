"""Pretrain an MAE with a pixel or bootstrapped target (any kind in target_encoder.TARGETS).

    python main_pretrain.py --target pixel
    python main_pretrain.py --target mae_k --k 10
    python main_pretrain.py --target ema --tau 0.995 --wse 20
    python main_pretrain.py --config configs/smoke.yaml --data_path D --output_dir O

Rerunning the same command with the same output directory resumes from checkpoint-last.pth.
"""
import dataclasses
import os
from typing import Callable, Optional

import torch
from timm.optim import param_groups_weight_decay

from config import PretrainConfig, parse_config
from dataio.augment import PRETRAIN
from dataio.datasets import image_channels, load_split, load_train, normalization
from dataio.loader import build_eval_loader, build_train_loader
from engine_eval import extract_features, knn_accuracy
from engine_pretrain import Pretraining
from models_mae import arch_of, create_model
from models_vit import check_input_channels, pool_tokens
from target_encoder import build_target
from util import distributed as dist
from util.checkpoint import load_checkpoint
from util.errors import UserError, cli
from util.memory import check_step_fits
from util.rundir import prepare_output_dir
from util.runtime import resolve_device, resolve_precision, speed_options
from util.trainer import Run, optimizer_steps

RESUME_KEYS = ("model", "optimizer", "config", "epoch", "step")  # what continuing a run reads


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


def find_resume(cfg) -> Optional[str]:
    """--resume, else this run directory's own checkpoint-last.pth, else None (a new run)."""
    if cfg.resume:
        return cfg.resume
    last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    return last if os.path.isfile(last) else None


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


@cli
def main(argv=None) -> None:
    cfg = parse_config(PretrainConfig, "pretrain", argv)
    device = dist.init_distributed(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)  # model initialisation: identical on every rank
    cfg.resolve(world_size=dist.world())
    resume = find_resume(cfg)
    ckpt = load_checkpoint(resume, kind="pretrain", require=RESUME_KEYS) if resume else None
    cfg.precision = resolve_precision(cfg.precision, device, ckpt["config"].get("precision") if ckpt else None)
    prepare_output_dir(cfg, resume, ckpt, write=dist.is_main())
    check_step_fits(cfg, "pretrain", device)

    train_set = load_train(cfg)
    images = train_set[0]
    if len(images) < cfg.batch_size * dist.world():
        raise UserError(f"batch_size {cfg.batch_size} x {dist.world()} ranks is larger than the dataset "
                        f"({len(images)} images)")
    mean, std = normalization(cfg)
    augment = dataclasses.replace(PRETRAIN, interpolation=cfg.crop_interpolation)
    loader = build_train_loader(cfg, images, train_set[1], device, mean, std, augment, resume=ckpt)
    # the per-step EMA schedule counts optimizer steps (--accum_iter batches each)
    engine = build_engine(cfg, device, train_set, mean, std, optimizer_steps(len(loader), cfg.accum_iter))
    if ckpt is not None:
        check_input_channels(ckpt["model"], image_channels(images), resume, key="encoder.patch_embed.proj.weight",
                             pretrained_on=ckpt["config"].get("dataset"))
        try:
            engine.load_state_dict(ckpt)
        except RuntimeError as e:
            raise UserError(f"{resume}: holds a {ckpt['config'].get('model')} run, which does not load into "
                            f"{cfg.model} ({str(e).splitlines()[0]})")
        at = f", step {ckpt['epoch_step']}" if ckpt.get("epoch_step") else ""
        print(f"resumed from {resume} at epoch {ckpt['epoch']}{at}")
    run = Run(cfg, engine, loader, ckpt, resume)
    n_params = sum(p.numel() for p in engine.model.parameters())
    print(f"{cfg.model} ({n_params / 1e6:.2f}M params) target={cfg.target} on {device}, "
          f"{len(images)} images, {len(loader)} batches/epoch, effective batch "
          f"{cfg.batch_size * cfg.accum_iter * dist.world()}, lr {cfg.lr:.2e}, output {cfg.output_dir}")
    run.fit()


if __name__ == "__main__":
    main()
