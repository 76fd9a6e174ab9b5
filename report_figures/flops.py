"""Pretraining compute of a run in FLOPs, for the schedule plan's equal-compute comparison
(report_figures/schedule.py): a run's wall-clock on a shared machine depends on what else ran, its FLOPs
do not.

pretrain_flops(config, log) = the sum over the logged epochs of (batches in the epoch) x (FLOPs of
one step in that epoch's phase: pixel, or features once the target switched), each phase's step
counted once by count_step_flops on random images of the run's shape, on the CPU.
"""
import dataclasses
import json
import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from config import PretrainConfig
from engine_pretrain import build_engine
from dataio.augment import PRETRAIN
from dataio.datasets import normalization
from dataio.loader import build_train_loader
from target_encoder import PIXEL_HEAD
from util.nonfinite import NonFiniteGuard
from util.trainer import Step

# what the step's FLOPs cannot depend on: left out of the cache key, so seeds share one count
_NOT_COST = ("seed", "output_dir", "resume", "data_path", "config", "print_freq", "save_freq")
# A step's FLOPs are linear in its batch (every op is per image): counted on a few images, scaled.
COUNT_BATCH = 8
_cache: Dict[str, float] = {}


def count_step_flops(engine, batch, epoch: int) -> int:
    """FLOPs of engine.train_step(batch) in epoch `epoch`'s phase (engine.begin_epoch(epoch) runs
    first: the target that epoch regresses, e.g. the EMA teacher created at the switch). Counts
    matmuls and convolutions (what flop_counter knows), forward + backward; the optimizer and
    EMA updates are elementwise and not counted. The step does update the model's weights."""
    engine.begin_epoch(epoch, resumed=False)
    with FlopCounterMode(display=False) as counter:
        engine.train_step(batch, Step(epoch, 1, 1, NonFiniteGuard()))
    return int(counter.get_total_flops())


def step_flops(config: dict, epoch: int) -> float:
    """FLOPs of one pretraining step (the run's batch) of the run whose config.yaml is `config`,
    in epoch `epoch`'s phase: counted on COUNT_BATCH random images (fp32 eager on the CPU, no kNN
    monitor) and scaled to the run's batch."""
    key = json.dumps({k: v for k, v in sorted(config.items()) if k not in _NOT_COST} | {"@epoch": epoch})
    if key not in _cache:
        fields = {f.name for f in dataclasses.fields(PretrainConfig)}
        cfg = PretrainConfig(**{k: v for k, v in config.items() if k in fields})
        batch, cfg.batch_size = cfg.batch_size, min(cfg.batch_size, COUNT_BATCH)
        with tempfile.TemporaryDirectory() as tmp:
            cfg.output_dir, cfg.device, cfg.precision, cfg.compile = tmp, "cpu", "fp32", False
            cfg.data_loader, cfg.num_workers, cfg.knn_every = "in_memory", 0, 0
            cfg.resolve()  # a config without lr (not a run's config.yaml): the one its blr gives
            mean, std = normalization(cfg)
            gen = np.random.default_rng(0)
            images = gen.integers(0, 256, (cfg.batch_size, cfg.input_size, cfg.input_size, len(mean)), dtype=np.uint8)
            labels = np.zeros(cfg.batch_size, dtype=np.int64)
            device = torch.device("cpu")
            loader = build_train_loader(cfg, images, labels, device, mean, std, PRETRAIN)
            engine = build_engine(cfg, device, (images, labels, 10), mean, std, len(loader))
            _cache[key] = count_step_flops(engine, next(iter(loader)), epoch) * batch / cfg.batch_size
    return _cache[key]


def pretrain_flops(config: dict, log: List[dict]) -> Optional[float]:
    """FLOPs of a pretraining run from its config.yaml and log.txt records (one per epoch, each
    with the cumulative optimizer `step` and what it regressed; a repeated epoch counts once).
    None when the log lacks them."""
    last = {}
    for r in log:
        if "epoch" in r and "step" in r and "regress" in r:
            last[int(r["epoch"])] = r
    if not last:
        return None
    first_of_phase: Dict[bool, int] = {}
    total, prev = 0.0, 0
    for epoch in sorted(last):
        feature = last[epoch]["regress"] != PIXEL_HEAD
        phase_epoch = first_of_phase.setdefault(feature, epoch)
        steps = int(last[epoch]["step"]) - prev
        prev = int(last[epoch]["step"])
        total += steps * int(config.get("accum_iter", 1)) * step_flops(config, phase_epoch)
    return total
