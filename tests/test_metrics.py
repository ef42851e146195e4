"""Downstream metrics on hand-made numbers with known answers."""

import pytest
import torch

from cstp.metrics import (VideoAverager, confusion_matrix, knn_accuracy, per_class_accuracy, retrieval_recall,
                          topk_accuracy)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0],     # top1 1, order 1,0,2
                           [0.5, 0.2, 0.3],     # top1 0, order 0,2,1
                           [0.2, 0.3, 0.5],     # top1 2, order 2,1,0
                           [0.6, 0.1, 0.3]])    # top1 0, order 0,2,1
    labels = torch.tensor([1, 2, 0, 1])
    acc = topk_accuracy(logits, labels, (1, 2, 5))
    assert acc["top1"] == pytest.approx(0.25)
    assert acc["top2"] == pytest.approx(0.5)     # rows 0 and 1
    assert acc["top5"] == pytest.approx(1.0)     # k beyond the class count: every row


def test_confusion_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 0, 1, 1, 3])
    predictions = torch.tensor([0, 1, 0, 1, 0, 3])
    cm = confusion_matrix(predictions, labels, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    per_class = per_class_accuracy(cm)
    assert per_class[0] == pytest.approx(2 / 3)
    assert per_class[1] == pytest.approx(0.5)
    assert per_class[2] is None                  # no video of class 2
    assert per_class[3] == pytest.approx(1.0)


def test_video_averager_means_only_valid_clips_and_sums_over_shards():
    # two "ranks" each see part of the clips; adding both into one averager is what all_reduce does
    a = VideoAverager(3, 2)
    a.add(torch.tensor([0, 0, 2]), torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]),
          torch.tensor([True, True, False]))     # the padding copy of video 2 is dropped
    a.add(torch.tensor([2, 0]), torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
    assert a.seen.tolist() == [True, False, True]
    assert a.means().tolist() == [[2.0, 1.0], [0.0, 0.0], [1.0, -1.0]]
    # logit averaging can change the decision compared with any single clip's argmax
    logits = a.means()[a.seen]
    assert logits.argmax(1).tolist() == [0, 0]


def test_retrieval_recall_at_k():
    # gallery of 4 unit vectors at known angles; cosine ignores the length
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    gallery_labels = torch.tensor([0, 1, 2, 1])
    query = torch.tensor([[2.0, 0.1],    # nearest: 0 (label 0), then 3 (1), 1 (1), 2 (2)
                          [0.1, 1.0],    # nearest: 1 (1) ...
                          [1.0, 0.2]])   # nearest: 0 (0), 3 (1), 1, 2 -> its label 2 is last
    query_labels = torch.tensor([0, 2, 2])
    r = retrieval_recall(query, query_labels, gallery, gallery_labels, ks=(1, 2, 3, 4, 50))
    assert r["r1"] == pytest.approx(1 / 3)       # only query 0
    assert r["r2"] == pytest.approx(1 / 3)
    # query 1: order 1, 3, 0, 2 -> label 2 at rank 4; query 2 too
    assert r["r3"] == pytest.approx(1 / 3)
    assert r["r4"] == pytest.approx(1.0)
    assert r["r50"] == pytest.approx(1.0)        # k beyond the gallery: the whole gallery


def test_leave_one_out_retrieval_never_finds_the_query_itself():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 0])
    r = retrieval_recall(feats, labels, feats, labels, ks=(1, 3), exclude_self=True)
    # without exclusion every query would find itself (R@1 = 1); with it: 0->1 (miss), 1->0 (miss),
    # 2->3 (miss), 3->2 (miss)
    assert r["r1"] == 0.0
    assert r["r3"] == 1.0


def test_knn_accuracy_is_a_similarity_weighted_vote():
    gallery = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    gallery_labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.1], [0.3, 1.0]])
    # k=1: nearest of q0 is 0 or 1 (class 0), of q1 is 4 (class 1)
    assert knn_accuracy(query, torch.tensor([0, 1]), gallery, gallery_labels, k=1) == 1.0
    # k=5: q0 sums class 0 (~2.0) vs class 1 (3 weaker sims, ~0.1+0.19+0.29) -> class 0, still right
    assert knn_accuracy(query, torch.tensor([0, 1]), gallery, gallery_labels, k=5) == 1.0
    # a majority of weak neighbours loses against two strong ones
    assert knn_accuracy(query[:1], torch.tensor([1]), gallery, gallery_labels, k=5) == 0.0
