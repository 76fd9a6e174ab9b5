"""Linear probe (and kNN) of a frozen pretrained encoder on image classification (--dataset).

    python main_linprobe.py                                  # newest pretraining run under output/
    python main_linprobe.py --finetune CKPT --checkpoint_key target
    python main_linprobe.py --finetune CKPT --cached_features --knn   # fast path + kNN
"""
import torch

import models_vit
from config import LinprobeConfig, parse_config
from dataio.augment import NO_AUGMENT, PROBE
from dataio.datasets import image_channels, load_splits, normalization
from dataio.loader import TensorLoader, build_eval_loader, build_train_loader
from engine_eval import extract_features, knn_accuracy
from engine_finetune import Classification, probe_optimizer
from eval_setup import load_pretrained, setup_eval_run
from util import distributed as dist
from util.errors import cli
from util.runtime import speed_options
from util.trainer import Run


def build_probe(cfg, start, own, num_classes: int, in_chans: int, device) -> models_vit.LinearProbe:
    """The frozen encoder at cfg.input_size (pretrained, or this run's own checkpoint) with a fresh head."""
    encoder = models_vit.create_model(cfg.model, num_classes=0, img_size=cfg.input_size, in_chans=in_chans)
    load_pretrained(encoder, cfg, start, own, "probing")
    probe = models_vit.LinearProbe(encoder, num_classes, cfg.pool)
    if own is not None:
        probe.load_state_dict(own["model"])  # the encoder weights come back with the head
    return probe.to(device)


def cached_features(cfg, probe, train_x, train_y, test_loader, device, mean, std):
    """Frozen features of both splits, extracted once, without augmentation."""
    train = extract_features(probe.features, build_eval_loader(cfg, train_x, train_y, device, mean, std))
    return train, extract_features(probe.features, test_loader)


@cli
def main(argv=None) -> None:
    cfg = parse_config(LinprobeConfig, "linprobe", argv)
    device, start, own = setup_eval_run(cfg, "linprobe")
    train_x, train_y, test_x, test_y, num_classes = load_splits(cfg)
    mean, std = normalization(cfg)
    probe = build_probe(cfg, start, own, num_classes, image_channels(train_x), device)

    test_loader = build_eval_loader(cfg, test_x, test_y, device, mean, std)
    extra = {"init": start.init, "checkpoint_key": cfg.checkpoint_key, "pool": cfg.pool}
    if cfg.cached_features or cfg.knn:
        (train_f, train_l), (test_f, test_l) = cached_features(cfg, probe, train_x, train_y, test_loader,
                                                               device, mean, std)
    if cfg.knn:
        extra["knn_acc"] = knn_accuracy(train_f, train_l, test_f, test_l, num_classes, cfg.knn_k, cfg.knn_t)
        print(f"kNN (k={cfg.knn_k}, t={cfg.knn_t}) accuracy: {extra['knn_acc']:.2f}")
    if cfg.cached_features:  # train the head alone on features extracted once
        model = probe.head
        train_loader = TensorLoader(train_f, train_l, cfg.batch_size, cfg.seed)
        test_loader = [(test_f[i:i + cfg.batch_size], test_l[i:i + cfg.batch_size])
                       for i in range(0, len(test_f), cfg.batch_size)]
    else:
        model = probe
        train_loader = build_train_loader(cfg, train_x, train_y, device, mean, std,
                                          PROBE if cfg.aug else NO_AUGMENT, resume=own)
    if dist.world() > 1:  # DDP syncs only parameters that require grad: the head's
        model = torch.nn.parallel.DistributedDataParallel(model)
    engine = Classification(cfg, "linprobe", probe, speed_options(model, cfg, device),
                            probe_optimizer(probe.head, cfg), torch.nn.CrossEntropyLoss(), test_loader,
                            extra=extra)
    if own is not None:
        engine.load_state_dict(own)
    print(f"linear probe of {cfg.model} on {device}: lr {cfg.lr:.2e}, output {cfg.output_dir}")
    Run(cfg, engine, train_loader, own, start.resume).fit()


if __name__ == "__main__":
    main()
