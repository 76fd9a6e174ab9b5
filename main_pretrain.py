"""Pretrain an MAE with a pixel or bootstrapped target (any kind in target_encoder.TARGETS).

    python main_pretrain.py --target pixel
    python main_pretrain.py --target mae_k --k 10
    python main_pretrain.py --target ema --tau 0.995 --wse 20
    python main_pretrain.py --config configs/smoke.yaml --data_path D --output_dir O

Rerunning the same command with the same output directory resumes from checkpoint-last.pth.
"""
import dataclasses
import os
from typing import Optional

import torch

from config import PretrainConfig, parse_config
from dataio.augment import PRETRAIN
from dataio.datasets import image_channels, load_train, normalization
from dataio.loader import build_train_loader
from engine_pretrain import build_engine
from models_vit import check_input_channels
from util import distributed as dist
from util.checkpoint import load_checkpoint
from util.errors import UserError, cli
from util.memory import check_step_fits
from util.rundir import prepare_output_dir
from util.runtime import resolve_device, resolve_precision
from util.trainer import Run, optimizer_steps

RESUME_KEYS = ("model", "optimizer", "config", "epoch", "step")  # what continuing a run reads


def find_resume(cfg) -> Optional[str]:
    """--resume, else this run directory's own checkpoint-last.pth, else None (a new run)."""
    if cfg.resume:
        return cfg.resume
    last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    return last if os.path.isfile(last) else None


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
