"""Weighted cosine kNN classifier on frozen features (as in DINO), and feature extraction."""
from typing import Callable, Tuple

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run `fn` (imgs (B, C, H, W) -> feats (B, D)) over a loader; returns (N, D) fp32, (N,) labels."""
    feats, labels = [], []
    for imgs, y in loader:
        feats.append(fn(imgs).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, t: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class predictions (M,) for test features (M, D) from train features (N, D).

    Each of the k most cosine-similar training samples votes for its class with weight
    exp(similarity / t), computed as exp((similarity - row max) / t): the same ranking, but a
    small t can no longer overflow to inf (inf votes tie, and argmax then picks the lowest class).
    """
    train = F.normalize(train_feats, dim=1)
    k = min(k, len(train))
    preds = []
    for i in range(0, len(test_feats), chunk):  # chunks bound the (chunk, N) similarity matrix
        sim = F.normalize(test_feats[i:i + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        weights = ((top_sim - top_sim[:, :1]) / t).exp()  # topk is sorted: column 0 is the row max
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                 k: int = 20, t: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, t)
    return (pred == test_labels).float().mean().item() * 100
