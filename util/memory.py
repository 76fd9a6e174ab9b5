"""Will one training step fit? Its memory, estimated from the config alone (no data read, no
weight allocated), and a one-line refusal when it exceeds the memory free where the step runs.

    total = fixed + batch_size x (per_image + num_masks x per_view)

fixed: 4 B per weight; a trained one also has its gradient, AdamW's two moments and the
    optimizer's temporaries (16 B), plus 2 B for autocast's bf16 copy. Frozen target encoders
    (pretraining) and the frozen probed encoder: 4 B. With --cached_features / --knn (probing)
    or --knn_every (pretraining): the (N, D) fp32 features of both splits, twice (extract_features
    concatenates its batches), and one kNN similarity block (1024, N_train). RUNTIME on top.
per_view, per_image: activations. Per ViT block and token of width D, training saves 2 D fp32
    values (the residual stream at both LayerNorms) and (7 + 2 r) D values at the activation
    precision (4 B fp32, 2 B bf16): LayerNorm outputs, q, k, v, the attention output and its
    reshaped copy, the MLP hidden layer before and after GELU (r = mlp_ratio; 2 D more with
    drop path); one block more covers the backward pass. The N x heads x T x T attention matrix
    is counted only where it is materialised (timm without fused attention): torch's fused SDPA
    keeps O(T) on CPU and CUDA (measured on CPU: 8 x 4 heads x 2048^2 attention, 537 MB as a
    matrix, peaked at 42 MB). A no-grad pass (target encoder, frozen probe) holds one block at a
    time, plus every block's output for a target encoder (forward_blocks keeps them all). Pixels:
    the batch and its crop/resize intermediates, each view, patchified targets and predictions.

Measured (AMD EPYC CPU, torch 2.14, peak RSS growth of a fresh process from this check through
3 training steps, vs this estimate), estimate / real:
    mae_vit_tiny_patch4 (the report's), 32x32, pixel, fp32: batch 32 / 64 / 128 / 256 1.27 /
    1.15 / 1.10 / 1.18 (32: 2 steps, tests/test_memory.py); bf16: batch 64 1.13, batch 512 (the
    recipe) 1.13; batch 32 x 4 masks 1.09; --target ema from epoch 0, batch 64 1.20. Smoke model
    at 128x128 (1024 patches) 1.40, at 32x32 batch 8 1.9 (RUNTIME dominates). vit_tiny_patch4
    fine-tuning batch 64 1.10, probing 1.25.
"""
import os
from dataclasses import dataclass
from typing import Tuple

import torch

# free_memory: the in-memory data check's reader, one for both; _bytes: its units, so both refusals read alike
from dataio.datasets import IMAGE_SIZE, _bytes, free_memory, image_folder_files
from models_arch import ARCHS
from util.errors import UserError

FP32 = 4
TRAINED = FP32 + 16  # weight, gradient, AdamW exp_avg + exp_avg_sq, foreach temporaries
# What a process's first steps add whatever the config: kernels paged in at first use, allocator
# slack (CPU), cuBLAS/cuDNN workspaces (CUDA). Measured 65-90 MB on CPU (the smoke model).
RUNTIME = 128 * 2**20
CHANNELS = 3  # RGB: Fashion-MNIST's single channel only shrinks the small per-pixel terms
HEAD_CLASSES = 1000  # the classifier's outputs before the data says how many: an upper bound
KNN_CHUNK = 1024  # engine_eval.knn_predict's test rows per similarity block
# train, test images of the fixed datasets (image_folder: counted from its files)
SPLIT_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "fashion_mnist": (60000, 10000)}


@dataclass
class Estimate:
    """Bytes of one training step: fixed + batch x (per_image + views x per_view)."""
    weights: int      # parameters, gradients, optimizer state (fixed)
    features: int     # cached features and a kNN block (fixed; 0 when not used)
    per_image: int    # activations and pixels of one image, once whatever the views
    per_view: int     # activations of one masked view (pretraining; 0 otherwise)
    batch: int
    views: int
    tokens: int       # patches per image, for the message
    input_size: int
    runtime: int = RUNTIME

    @property
    def activations(self) -> int:
        return self.batch * (self.per_image + self.views * self.per_view)

    @property
    def fixed(self) -> int:
        """The bytes a smaller batch does not shrink."""
        return self.weights + self.features + self.runtime

    @property
    def total(self) -> int:
        return self.fixed + self.activations


def block_bytes(tokens: int, width: int, heads: int, mlp_ratio: float, act: int, drop_path: bool = False) -> int:
    """Bytes one sequence of `tokens` saves for backward in one ViT block (what a no-grad pass
    holds at once). act: bytes per activation (4 fp32, 2 bf16); drop_path: stochastic depth
    keeps both branches' rescaled outputs too."""
    values = 7 * width + 2 * int(width * mlp_ratio) + (2 * width if drop_path else 0)
    saved = tokens * (2 * width * FP32 + values * act)
    if not _fused_attention():  # timm's manual path keeps the softmax probabilities
        saved += heads * tokens * tokens * act
    return saved


def stack_bytes(tokens: int, width: int, depth: int, heads: int, mlp_ratio: float, act: int,
                train: bool, drop_path: bool = False) -> int:
    """Bytes of `depth` blocks over one sequence: all saved (+1 block for backward), or one at a time."""
    return block_bytes(tokens, width, heads, mlp_ratio, act, drop_path) * (depth + 1 if train else 1)


def _fused_attention() -> bool:
    from timm.layers import use_fused_attn
    return use_fused_attn()


def _params(model: torch.nn.Module) -> Tuple[int, int]:
    """(trained, frozen) parameter counts."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters()) - trained


def _weights(trained: int, frozen: int, precision: str) -> int:
    return trained * (TRAINED + (2 if precision == "bf16" else 0)) + frozen * FP32


def feature_bytes(cfg, width: int, knn: bool) -> int:
    """Cached (N, width) fp32 features of both splits (twice while concatenated) and, for kNN,
    one (KNN_CHUNK, N_train) similarity block with its normalised copy of the train features."""
    if cfg.dataset in SPLIT_SIZES:
        n_train, n_test = SPLIT_SIZES[cfg.dataset]
    else:  # an image folder: its file counts (no pixel read)
        n_train, n_test = (len(image_folder_files(cfg.data_path, t)[0]) for t in (True, False))
    n_train = min(n_train, cfg.train_subset or n_train)
    total = 2 * (n_train + n_test) * width * FP32
    return total + (KNN_CHUNK + width) * n_train * FP32 if knn else total


def pretrain_estimate(cfg) -> Estimate:
    """One pretraining step of cfg (a resolved PretrainConfig; cfg.precision bf16 or fp32)."""
    from models_mae import MAEEncoder, arch_of, create_model
    from target_encoder import TARGETS
    a, size, act = arch_of(cfg.model), cfg.input_size, 2 if cfg.precision == "bf16" else FP32
    L = a.grid(size) ** 2
    keep, pixels = int(L * (1 - cfg.mask_ratio)), CHANNELS * size * size
    teachers = TARGETS[cfg.target].frozen_archs(cfg, a)
    feature_dim = teachers[0].embed_dim if teachers else a.embed_dim  # an upper bound for HOG
    with torch.device("meta"):  # exact counts (position embeddings included), nothing allocated
        model = create_model(cfg.model, img_size=size, in_chans=CHANNELS, feature_decoder=cfg.feature_decoder,
                             feature_dim=feature_dim)
        frozen = sum(p.numel() for t in teachers
                     for p in MAEEncoder(size, in_chans=CHANNELS, **t.encoder_kwargs()).parameters())
    trained, fixed = _params(model)
    weights = _weights(trained, fixed + frozen, cfg.precision)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        weights += trained * FP32  # DDP's gradient buckets
    features = feature_bytes(cfg, a.embed_dim, knn=True) if cfg.knn_every else 0
    # both decoders run at once only when the pixel loss stays on beside a separate feature decoder
    decoders = 2 if cfg.feature_decoder == "separate" and cfg.pixel_weight > 0 else 1
    per_view = (stack_bytes(1 + keep, a.embed_dim, a.depth, a.num_heads, a.mlp_ratio, act, True)
                + 2 * L * a.embed_dim * act  # patch embedding and its masked gather
                + decoders * (stack_bytes(1 + L, a.decoder_embed_dim, a.decoder_depth, a.decoder_num_heads,
                                          a.mlp_ratio, act, True)
                              + 4 * (1 + L) * a.decoder_embed_dim * act)  # embed, unshuffle, + pos
                + 4 * pixels * FP32  # the view, its pixel target, prediction and gradient
                # feature target, prediction, gradient (counted for pixel MAE too: a few % over)
                + 3 * L * feature_dim * FP32)
    per_image = 3 * pixels * FP32  # the augmented batch and crop_resize's intermediates
    if teachers:  # no-grad target pass over the full image; every block output kept
        per_image += max(stack_bytes(1 + L, t.embed_dim, t.depth, t.num_heads, t.mlp_ratio, act, False)
                         + t.depth * (1 + L) * t.embed_dim * FP32 for t in teachers)
    return Estimate(weights, features, per_image, per_view, cfg.batch_size, cfg.num_masks, L, size)


def eval_estimate(cfg, script: str) -> Estimate:
    """One fine-tuning (all trained) or linear-probing (frozen encoder, no-grad) step of cfg,
    after eval_setup resolved its model and input size."""
    import models_vit
    arch, size, act = ARCHS[cfg.model], cfg.input_size, 2 if cfg.precision == "bf16" else FP32
    L, train = arch.grid(size) ** 2, script == "finetune"
    with torch.device("meta"):
        model = models_vit.create_model(cfg.model, num_classes=HEAD_CLASSES, img_size=size, in_chans=CHANNELS)
    trained, frozen = _params(model)
    weights = _weights(trained, frozen, cfg.precision) if train else _weights(0, trained + frozen, cfg.precision)
    features = 0
    if not train and (cfg.cached_features or cfg.knn):
        features = feature_bytes(cfg, arch.embed_dim, knn=cfg.knn)
    per_image = (stack_bytes(1 + L, arch.embed_dim, arch.depth, arch.num_heads, arch.mlp_ratio, act, train,
                             drop_path=train and cfg.drop_path > 0)
                 + 3 * CHANNELS * size * size * FP32)  # the batch and the loader's intermediates
    return Estimate(weights, features, per_image, 0, cfg.batch_size, 1, L, size)


def limit_for(device: torch.device) -> Tuple[int, str]:
    """(bytes free for one process's step, where): the CUDA device's free memory, else RAM
    shared by this machine's processes (torchrun)."""
    free = free_memory(device)
    cuda = [k for k in free if k != "RAM"]
    if cuda:
        return free[cuda[0]], cuda[0]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return free["RAM"] // local, "RAM" + (f" (shared by {local} processes)" if local > 1 else "")


def advice(est: Estimate, limit: int) -> str:
    """Which flag to lower: --batch_size / --num_masks with the largest value that fits under
    `limit` bytes, when that can be enough; --input_size when it is above the datasets' 32."""
    room = limit - est.fixed
    if room <= 0:
        if est.features > est.weights:
            return "leave out --cached_features / --knn / --knn_every, or set --train_subset"
        return "lower --input_size (the position embeddings grow with it) or pick a smaller --model"
    options = []
    max_batch = room // (est.per_image + est.views * est.per_view)
    if max_batch >= 1:
        options.append(f"--batch_size to {max_batch}")
    if est.views > 1:
        max_views = (room // est.batch - est.per_image) // est.per_view
        if max_views >= 1:
            options.append(f"--num_masks to {max_views}")
    if est.input_size > IMAGE_SIZE or not options:
        options.append("--input_size")
    return "lower " + " or ".join(options)


def check_step_fits(cfg, script: str, device: torch.device) -> None:
    """Refuse (UserError, one line) a config whose training step would not fit in the memory
    free on `device`. script: pretrain | finetune | linprobe; call before any data or weight."""
    est = pretrain_estimate(cfg) if script == "pretrain" else eval_estimate(cfg, script)
    limit, where = limit_for(device)
    if est.total <= limit:
        return
    views = f" x num_masks {est.views}" if est.views > 1 else ""
    features = f", features {_bytes(est.features)}" if est.features else ""
    raise UserError(f"one {script} step would need about {_bytes(est.total)} (weights and optimizer state "
                    f"{_bytes(est.weights)}, activations {_bytes(est.activations)} for batch_size {est.batch}{views} "
                    f"at {est.tokens:,} patches per image{features}, runtime {_bytes(est.runtime)}), more than the "
                    f"{_bytes(limit)} of {where} free; {advice(est, limit)}")
