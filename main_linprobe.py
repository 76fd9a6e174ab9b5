"""Linear probe (and kNN) of a frozen pretrained encoder on CIFAR-10.

    python main_linprobe.py                                  # newest pretraining run under output/
    python main_linprobe.py --finetune CKPT --checkpoint_key target
    python main_linprobe.py --finetune CKPT --cached_features --knn   # fast path + kNN
"""
import os

import torch
from timm.optim import Lars
from torchvision import transforms

import models_vit
from engine_finetune import fit
from config import LinprobeConfig, parse_config, save_yaml
from dataio.datasets import dataset_stats, eval_transform, load_splits
from util.errors import cli
from engine_eval import extract_features, knn_accuracy
from dataio.loader import EvalLoader, TensorLoader, build_train_loader
from util.pretrained import setup_eval_run
from util import distributed as dist
from util.runtime import speed_options


def build_optimizer(head: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """LARS on the head; the trust ratio adapts weight matrices only, not biases (as in MAE)."""
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": weights, "always_adapt": True},
                 {"params": others, "weight_decay": 0.0}],
                lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def train_transform(img_size: int, mean, std):
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])


@cli
def main(argv=None) -> None:
    cfg = parse_config(LinprobeConfig, "linprobe", argv)
    device, start, own = setup_eval_run(cfg, "linprobe")

    train_x, train_y, test_x, test_y, num_classes = load_splits(cfg)
    mean, std = dataset_stats(cfg.dataset)
    img_size, in_chans = train_x.shape[1], train_x.shape[3]

    encoder = models_vit.create_model(cfg.model, num_classes=0, img_size=img_size, in_chans=in_chans)
    if own is None and start.init is not None:
        state = models_vit.pretrained_encoder_state(start.init_ckpt, cfg.checkpoint_key, start.init)
        report = models_vit.load_pretrained_encoder(encoder, state, start.init)
        print(f"probing {cfg.model} from {start.init} [{cfg.checkpoint_key}]: {report}")
    probe = models_vit.LinearProbe(encoder, num_classes, cfg.pool)
    if own is not None:
        probe.load_state_dict(own["model"])  # the encoder weights come back with the head
    probe.to(device)

    test_loader = EvalLoader(test_x, test_y, cfg.batch_size, device, mean, std)
    results_extra = {"init": start.init, "checkpoint_key": cfg.checkpoint_key, "pool": cfg.pool}
    train_feats = None
    if cfg.cached_features or cfg.knn:
        train_feats, train_lab = extract_features(
            probe.features, EvalLoader(train_x, train_y, cfg.batch_size, device, mean, std))
        test_feats, test_lab = extract_features(probe.features, test_loader)
    if cfg.knn:
        acc = knn_accuracy(train_feats, train_lab, test_feats, test_lab, num_classes, cfg.knn_k, cfg.knn_t)
        results_extra["knn_acc"] = acc
        print(f"kNN (k={cfg.knn_k}, t={cfg.knn_t}) accuracy: {acc:.2f}")

    if cfg.cached_features:  # train the head alone on features extracted once
        model = probe.head
        train_loader = TensorLoader(train_feats, train_lab, cfg.batch_size, cfg.seed)
        test_loader = [(test_feats[i:i + cfg.batch_size], test_lab[i:i + cfg.batch_size])
                       for i in range(0, len(test_feats), cfg.batch_size)]
    else:
        model = probe
        transform = train_transform(img_size, mean, std) if cfg.aug else eval_transform(mean, std)
        train_loader = build_train_loader(cfg, train_x, train_y, device, mean, std, scale=(0.08, 1.0),
                                          augment=cfg.aug, transform=transform)
    optimizer = build_optimizer(probe.head, cfg)
    if dist.world() > 1:  # DDP syncs only parameters that require grad: the head's
        model = torch.nn.parallel.DistributedDataParallel(model)
    model = speed_options(model, cfg, device)

    if dist.is_main():
        save_yaml(cfg.to_dict(), os.path.join(cfg.output_dir, "config.yaml"))
    print(f"linear probe of {cfg.model} on {device}: lr {cfg.lr:.2e}, output {cfg.output_dir}")
    fit(cfg, "linprobe", model, optimizer, torch.nn.CrossEntropyLoss(), train_loader, test_loader,
        own, save_module=probe, extra=results_extra)


if __name__ == "__main__":
    main()
