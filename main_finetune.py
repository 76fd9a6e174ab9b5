"""Fine-tune a pretrained encoder (or a random one) on image classification (--dataset).

    python main_finetune.py --finetune output/pretrain_ema/checkpoint-last.pth
    python main_finetune.py --resume output/pretrain_ema/checkpoint-last.pth   # same: a pretraining ckpt initialises
    python main_finetune.py --from_scratch                                     # the random-init baseline
    python main_finetune.py                                                    # newest pretraining run under output/
"""

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
from config import FinetuneConfig, parse_config
from dataio.augment import finetune_transform
from dataio.datasets import image_channels, load_splits, normalization
from dataio.loader import build_eval_loader, build_train_loader
from engine_finetune import Classification, finetune_optimizer
from eval_setup import load_pretrained, setup_eval_run
from util import distributed as dist
from util.errors import UserError, cli
from util.runtime import speed_options
from util.trainer import Run


def build_criterion(cfg, num_classes: int):
    """(timm Mixup or None, loss): soft targets with mixup/cutmix, else label smoothing."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                         num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


@cli
def main(argv=None) -> None:
    cfg = parse_config(FinetuneConfig, "finetune", argv)
    device, start, own = setup_eval_run(cfg, "finetune")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")

    train_x, train_y, test_x, test_y, num_classes = load_splits(cfg)
    mean, std = normalization(cfg)

    model = models_vit.create_model(cfg.model, num_classes=num_classes, global_pool=cfg.global_pool,
                                    drop_path_rate=cfg.drop_path, img_size=cfg.input_size,
                                    in_chans=image_channels(train_x))
    load_pretrained(model, cfg, start, own, "initialised")
    model.to(device)

    train_loader = build_train_loader(cfg, train_x, train_y, device, mean, std,
                                      finetune_transform(cfg, cfg.input_size, mean, std), resume=own)
    forward = torch.nn.parallel.DistributedDataParallel(model) if dist.world() > 1 else model
    mixup_fn, criterion = build_criterion(cfg, num_classes)
    engine = Classification(cfg, "finetune", model, speed_options(forward, cfg, device), finetune_optimizer(model, cfg),
                            criterion, build_eval_loader(cfg, test_x, test_y, device, mean, std), mixup_fn,
                            extra={"init": start.init, "checkpoint_key": cfg.checkpoint_key})
    if own is not None:
        engine.load_state_dict(own)
    print(f"fine-tuning {cfg.model} on {device}: {len(train_x)} images, lr {cfg.lr:.2e}, "
          f"output {cfg.output_dir}")
    Run(cfg, engine, train_loader, own, start.resume).fit()


if __name__ == "__main__":
    main()
