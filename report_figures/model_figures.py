"""Pictures of a pretrained model from its checkpoint: reconstructions (pixel head) and how
well the feature head predicts its target (target encoder)."""
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from report_figures.plots import pyplot
from target_encoder import FEATURE_HEAD, PIXEL_HEAD, build_target


def load_pretrain(ckpt_path: str):
    """(model, target, cfg) of a pretraining checkpoint, the model's feature head as wide as its target."""
    from config import PretrainConfig
    from models_mae import create_model
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = PretrainConfig()
    for key, value in ckpt["config"].items():  # keys of older or newer versions are ignored
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    proj = ckpt["model"]["encoder.patch_embed.proj.weight"]  # (D, C, p, p)
    grid = int(round((ckpt["model"]["encoder.pos_embed"].shape[1] - 1) ** 0.5))
    target = build_target(cfg)
    model = create_model(cfg.model, img_size=grid * proj.shape[-1], in_chans=proj.shape[1],
                         feature_dim=ckpt["model"]["decoder_pred_feat.weight"].shape[0],  # the target's width
                         feature_decoder=cfg.feature_decoder)
    model.load_state_dict(ckpt["model"])
    model.eval()
    target.load_state_dict(ckpt, model.encoder)
    return model, target, cfg


def _test_images(cfg, n: int):
    """The first n test images, normalised, and the (mean, std) to undo it."""
    from dataio.datasets import dataset_stats, load_dataset
    images, _, _ = load_dataset(cfg.dataset, cfg.data_path, train=False, download=False)
    mean, std = dataset_stats(cfg.dataset)
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s, m, s


def _row_name(ckpt_path: str) -> str:
    """RUNS/NAME/seedS/pretrain/checkpoint-last.pth -> NAME."""
    return os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(ckpt_path))))


def _reconstruct(model, cfg, imgs: torch.Tensor, seed: int):
    """(reconstruction, removed-patch mask as an image: 1 = removed) of one masked forward pass."""
    torch.manual_seed(seed)
    with torch.no_grad():
        preds, mask = model(imgs, cfg.mask_ratio, heads=(PIXEL_HEAD, FEATURE_HEAD))
        pred = preds[PIXEL_HEAD]
        if cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            patches = model.patchify(imgs)
            mu, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mu
        rec = model.unpatchify(pred)
        pmask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    return rec, pmask


def reconstruction_figure(ckpt_path: str, out_path: str, n: int = 8, seed: int = 0) -> None:
    """Original / masked / reconstruction / reconstruction with visible patches, n test images."""
    plt = pyplot()
    model, _, cfg = load_pretrain(ckpt_path)
    imgs, m, s = _test_images(cfg, n)
    rec, pmask = _reconstruct(model, cfg, imgs, seed)
    show = lambda t: (t * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # noqa: E731
    masked = show(imgs * (1 - pmask))
    masked[(pmask.permute(0, 2, 3, 1).numpy() > 0.5).all(-1)] = 0.5  # grey for removed patches
    cols = [("original", show(imgs)), ("masked", masked), ("reconstruction", show(rec)),
            ("reconstruction + visible", show(imgs * (1 - pmask) + rec * pmask))]
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(6, 1.5 * n))
    axes = np.asarray(axes).reshape(n, 4)
    for i in range(n):
        for j, (title, arr) in enumerate(cols):
            axes[i, j].imshow(arr[i].squeeze(-1) if arr.shape[-1] == 1 else arr[i], interpolation="nearest",
                              cmap="gray")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
    fig.suptitle(f"{_row_name(ckpt_path)}: pixel head, mask {cfg.mask_ratio}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def feature_similarity_figure(ckpt_path: str, out_path: str, n: int = 8, seed: int = 0) -> Optional[float]:
    """Per-patch cosine similarity between the target (as the run regressed it) and the feature
    head's prediction, on removed patches (visible patches grey). Returns the mean over removed
    patches; None, and no figure, for a checkpoint without a feature target."""
    plt = pyplot()
    model, target, cfg = load_pretrain(ckpt_path)
    if target.switch_epoch is None or any(t is None for t in target.teachers()):
        return None  # no feature target (yet): pixel MAE, or a bootstrapped run before its switch
    imgs, m, s = _test_images(cfg, n)
    torch.manual_seed(seed)
    with torch.no_grad():
        preds, mask = model(imgs, cfg.mask_ratio, heads=(PIXEL_HEAD, FEATURE_HEAD))
        cos = F.cosine_similarity(preds[FEATURE_HEAD].float(), target.feature_target(imgs).float(), dim=-1)
    grid = int(cos.shape[1] ** 0.5)
    mean_cos = float((cos * mask).sum() / mask.sum())
    cos_map = cos.masked_fill(mask < 0.5, float("nan")).view(-1, grid, grid).numpy()
    show = (imgs * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    n = imgs.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.6))
    axes = np.asarray(axes).reshape(2, n)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = None
    for i in range(n):
        axes[0, i].imshow(show[i].squeeze(-1) if show.shape[-1] == 1 else show[i], interpolation="nearest",
                          cmap="gray")
        im = axes[1, i].imshow(cos_map[i], vmin=-1, vmax=1, cmap=cmap, interpolation="nearest")
        axes[1, i].set_title(f"{np.nanmean(cos_map[i]):.2f}", fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02)
    fig.suptitle(f"{_row_name(ckpt_path)}: cos(target features, feature-head prediction) on removed patches "
                 f"(grey: visible), mean {mean_cos:.3f}", fontsize=8)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return mean_cos
