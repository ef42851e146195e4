"""Downstream metrics: video accuracy (top-k, per class, confusion matrix), per-video
averaging of clip outputs across ranks, retrieval recall@k and kNN accuracy.

Everything works on plain tensors, so it is tested on hand-made numbers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

RETRIEVAL_KS = (1, 5, 10, 20, 50)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{"top1": ..., "top5": ...}: share of rows whose label is among the k highest logits.
    k larger than the number of classes counts every row as a hit."""
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices
        out[f"top{k}"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class (diagonal / row sum); None for a class with no test video."""
    totals = confusion.sum(dim=1)
    return [None if t == 0 else (confusion[i, i] / t).item() for i, t in enumerate(totals.tolist())]


class VideoAverager:
    """Sums clip outputs per video, then averages: the reference's logit averaging
    (docs/method.md#test-protocol). Under DDP each clip is seen by exactly one rank, so summing the
    sums and counts over ranks gives every rank the exact per-video mean."""

    def __init__(self, num_videos: int, dim: int, device="cpu"):
        self.sums = torch.zeros(num_videos, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_videos, dtype=torch.float64, device=device)

    def add(self, video_index: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None):
        if valid is not None:
            keep = valid.to(torch.bool).to(values.device)
            video_index, values = video_index.to(values.device)[keep], values[keep]
        video_index = video_index.to(self.sums.device).long()
        self.sums.index_add_(0, video_index, values.detach().to(self.sums))
        self.counts.index_add_(0, video_index, torch.ones_like(video_index, dtype=self.counts.dtype))

    def all_reduce(self):
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.counts)
        return self

    @property
    def seen(self) -> torch.Tensor:
        return self.counts > 0

    def means(self) -> torch.Tensor:
        """(num_videos, dim) float32 means; rows of unseen videos are zero."""
        return (self.sums / self.counts.clamp(min=1)[:, None]).float()


def retrieval_recall(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                     gallery_labels: torch.Tensor, ks=RETRIEVAL_KS, exclude_self: bool = False) -> dict:
    """The VCOP / PRP protocol: each query (test video) retrieves its k nearest gallery
    (train) videos by cosine similarity; a hit when any of them has the query's class.
    Returns {"r1": ..., "r5": ...}; k beyond the gallery size uses the whole gallery.
    `exclude_self`: query and gallery are the same set; a video never retrieves itself."""
    nearest = _nearest(query, gallery, max(ks), exclude_self)
    same = gallery_labels[nearest] == query_labels[:, None]
    return {f"r{k}": same[:, :k].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                 gallery_labels: torch.Tensor, k: int = 10, num_classes: int | None = None,
                 exclude_self: bool = False) -> float:
    """kNN classification: each query takes the class with the largest summed cosine
    similarity among its k nearest gallery videos (a similarity-weighted vote; equal
    votes go to the lower class index)."""
    num_classes = num_classes or int(max(gallery_labels.max(), query_labels.max())) + 1
    nearest = _nearest(query, gallery, k, exclude_self)
    sims = F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    near_sims = sims.gather(1, nearest)
    votes = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, gallery_labels[nearest].long(), near_sims.double())
    return (votes.argmax(dim=1) == query_labels).float().mean().item()


def _nearest(query: torch.Tensor, gallery: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Indices (Q, min(k, G)) of the most cosine-similar gallery rows, nearest first
    (ties: the lower gallery index first, so results do not depend on the sort)."""
    sims = F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    available = gallery.shape[0]
    if exclude_self:
        sims.fill_diagonal_(-math.inf)
        available -= 1
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    return order[:, :min(k, available)]
