"""Pretrain an MAE on CIFAR-10 with a pixel, MAE-K or EMA target.

    python main_pretrain.py --target pixel
    python main_pretrain.py --target mae_k --k 10
    python main_pretrain.py --target ema --tau 0.995 --wse 20
    python main_pretrain.py --config configs/smoke.yaml --data_path D --output_dir O

Rerunning the same command with the same output directory resumes from checkpoint-last.pth.
"""
import os
import sys
import time

import torch
from timm.optim import param_groups_weight_decay

import engine_pretrain
from models_mae import create_model
from target_encoder import build_target
from util.checkpoint import load_checkpoint, rng_state, save_checkpoint
from config import PretrainConfig, parse_config, save_yaml
from dataio.datasets import dataset_stats, load_dataset, load_train, pretrain_transform
from util.errors import UserError, cli
from engine_eval import extract_features, knn_accuracy
from dataio.loader import EvalLoader, build_train_loader
from util.logger import RunLogger
from util.nonfinite import NonFiniteGuard
from util.rundir import prepare_output_dir
from util import distributed as dist
from util.runtime import resolve_device, seed_epoch, speed_options
from util.signals import StopRequest


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter, both heads included, from step 0."""
    groups = param_groups_weight_decay(
        model, cfg.weight_decay, no_weight_decay_list=("encoder.cls_token", "mask_token"))
    fused = next(model.parameters()).is_cuda  # one kernel for all tensors on CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def knn_monitor(model, cfg, device, mean, std, num_classes: int, sets) -> float:
    """kNN accuracy of the online encoder's frozen features: train set -> test set.

    sets: ((train images, labels), (test images, labels)), uint8 (N, H, W, C) and int64 (N,),
    loaded once per run rather than at every evaluation.
    """
    from models_vit import pool_tokens
    encode = lambda x: pool_tokens(model.encoder.forward_features(x), cfg.knn_pool)  # noqa: E731
    model.eval()
    (tr_f, tr_y), (te_f, te_y) = [extract_features(encode, EvalLoader(x, y, cfg.batch_size, device, mean, std))
                                  for x, y in sets]
    return knn_accuracy(tr_f, tr_y, te_f, te_y, num_classes, cfg.knn_k, cfg.knn_t)


def find_resume(cfg) -> str:
    if cfg.resume:
        return cfg.resume
    last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    return last if os.path.isfile(last) else ""


@cli
def main(argv=None) -> None:
    cfg = parse_config(PretrainConfig, "pretrain", argv)
    device = dist.init_distributed(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)  # model initialisation: identical on every rank
    cfg.resolve(world_size=dist.world())
    prepare_output_dir(cfg, write=dist.is_main())

    images, labels, num_classes = load_train(cfg)
    if len(images) < cfg.batch_size * dist.world():
        raise UserError(f"batch_size {cfg.batch_size} x {dist.world()} ranks is larger than the dataset "
                        f"({len(images)} images)")
    mean, std = dataset_stats(cfg.dataset)
    model = create_model(cfg.model, img_size=images.shape[1], in_chans=images.shape[3]).to(device)
    loader = build_train_loader(cfg, images, labels, device, mean, std, scale=(0.2, 1.0),
                                transform=pretrain_transform(images.shape[1], mean, std))
    forward = model
    if dist.world() > 1:
        # The head a phase does not use gets no gradient (pixel head after the switch, feature
        # head before it), hence find_unused_parameters. The target encoder stays outside DDP.
        forward = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    forward = speed_options(forward, cfg, device)
    optimizer = build_optimizer(model, cfg)
    target = build_target(cfg, steps_per_epoch=len(loader))
    if cfg.target_layers > len(model.encoder.blocks):
        raise UserError(f"target_layers {cfg.target_layers} exceeds the encoder depth {len(model.encoder.blocks)}")

    start_epoch, step, epoch_step, resumed_rng = 0, 0, 0, None
    guard = NonFiniteGuard(cfg.skip_nonfinite)
    resume = find_resume(cfg)
    if resume:
        ckpt = load_checkpoint(resume, kind="pretrain")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"{resume}: does not match model {cfg.model} ({str(e).splitlines()[0]})")
        optimizer.load_state_dict(ckpt["optimizer"])
        target.load_state_dict(ckpt["target"], model.encoder, ckpt.get("target_slow"))
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        epoch_step = ckpt.get("epoch_step", 0)  # > 0: stopped inside epoch `start_epoch`
        resumed_rng = ckpt["rng"] if epoch_step else None
        guard.skipped = ckpt.get("skipped_nonfinite", 0)
        print(f"resumed from {resume} at epoch {start_epoch}" + (f", step {epoch_step}" if epoch_step else ""))

    if dist.is_main():
        save_yaml(cfg.to_dict(), os.path.join(cfg.output_dir, "config.yaml"))
    logger = RunLogger(cfg.output_dir, enabled=dist.is_main())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model} ({n_params / 1e6:.2f}M params) target={cfg.target} on {device}, "
          f"{len(images)} images, {len(loader)} steps/epoch, lr {cfg.lr:.2e}, output {cfg.output_dir}")
    last_path = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    stop = StopRequest()
    knn_sets = None
    if cfg.knn_every and dist.is_main():  # the train arrays are the ones pretraining uses
        knn_sets = ((images, labels), load_dataset(cfg.dataset, cfg.data_path, train=False)[:2])

    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)
        loader.set_epoch(epoch)
        # Mid-epoch resume: the epoch-start refresh already happened in the first run.
        refreshed = False if resumed_rng is not None else target.on_epoch_start(epoch, model.encoder)
        stats = engine_pretrain.train_one_epoch(model, target, loader, optimizer, epoch, cfg, step, logger,
                                                forward, skip=epoch_step, stop=stop, resume_rng=resumed_rng,
                                                guard=guard)
        resumed_rng = None
        if stats["bad_step"] >= 0:  # nothing is saved: the last good checkpoint stays as it is
            sys.exit(f"error: non-finite loss at epoch {epoch}, step {stats['bad_step']} of the epoch; "
                     f"stopped without saving; last good checkpoint: "
                     f"{last_path if os.path.isfile(last_path) else 'none'}{guard.note()}")
        step += stats.pop("steps")
        epoch_step = stats.pop("epoch_step")
        if dist.world() > 1 and not dist.all_equal(target.checksum().to(device)):
            sys.exit(f"error: target encoders differ across ranks after epoch {epoch}")
        finished = epoch_step == len(loader)
        if finished:
            target.on_epoch_end(epoch, model.encoder)
        state = {"kind": "pretrain", "model": model.state_dict(), "target": target.state_dict(),
                 "target_slow": target.slow_state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": epoch + 1 if finished else epoch,
                 "epoch_step": 0 if finished else epoch_step, "step": step,
                 "config": cfg.to_dict(), "rng": rng_state(), "skipped_nonfinite": guard.skipped}
        if dist.is_main():
            save_checkpoint(state, last_path)
        if not finished:
            print(f"{stop.signal_name}: stopped at epoch {epoch}, step {epoch_step}; saved {last_path}. "
                  f"Rerun the same command to continue.")
            break
        epoch_step = 0
        if dist.is_main() and ((epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint(state, os.path.join(cfg.output_dir, f"checkpoint-{epoch + 1}.pth"))
        record = {"epoch": epoch, **target.describe(epoch), "target_refreshed": refreshed,
                  **stats, "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        if dist.is_main() and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            record["knn_acc"] = knn_monitor(model, cfg, device, mean, std, num_classes, knn_sets)
        logger.epoch(record)
        print(f"epoch {epoch}: loss {stats['loss']:.4f} ({record['regress']}) "
              f"lr {stats['lr']:.2e} {stats['images_per_s']:.0f} img/s {stats['seconds']:.1f}s"
              + (f" knn {record['knn_acc']:.2f}" if "knn_acc" in record else ""))
        if stop.requested:  # the signal came with the epoch's last step: stop cleanly here
            print(f"{stop.signal_name}: stopped after epoch {epoch}; saved {last_path}. "
                  f"Rerun the same command to continue.")
            break
    else:
        print(f"done: {last_path}")
    stop.restore()
    logger.close()
    dist.barrier()  # rank 0's last save is on disk before any rank exits

if __name__ == "__main__":
    main()
