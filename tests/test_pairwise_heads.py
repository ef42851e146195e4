"""The pairwise heads (spatial and temporal overlap, on concat(y1, y2)) learn a cue that
lives ONLY in the difference between the two views, through the training engine's own
step (cstp.engine.Trainer.train_step: the real CSTPModel, the reference init, per-view
BatchNorm in train mode, the real loss with that head's weight alone).

Each sample's view 1 is a flat grey g (random per sample) and its view 2 is g + label·δ:
neither view alone says anything about the label, so the head can only learn it by
comparing the two rows it is given. A mix-up of rows between view 1, view 2 and the
labels, a head fed one view twice, a loss reading the wrong logits or label, or BN
erasing the per-sample offset would leave it at chance, which is what the control
(labels shuffled against the rows) shows the same training does.
"""

import pytest
import torch

from cstp.config import load_config
from cstp.engine import ACCURACIES, LOSS_TERMS, Trainer

BATCH, FRAMES, CROP = 16, 4, 16
STEPS, LAST = 80, 20          # measured: the last 20 steps' accuracy is 0.57-0.73 over 4 seeds (chance 0.2)
LR, DELTA = 0.05, 0.4
LABEL_KEYS = {"spatial": "spatial_label", "temporal": "temporal_label"}
CLASSES = 5                    # five overlap rates


class _Loader:   # what Trainer reads of a loader
    batch_size = BATCH
    steps_per_epoch = STEPS


def _trainer(tmp_path, head: str) -> Trainer:
    weights = [f"loss.{name}={1.0 if name == head else 0.0}" for name in ("byol", *ACCURACIES)]
    cfg = load_config(None, ["model.width=0.0625", "proj_hidden=32", "proj_dim=16", f"plan.frames={FRAMES}",
                             f"crop_size={CROP}", f"batch_size={BATCH}", "train.threads=1", "device=cpu",
                             "tensorboard=false", "run.seed=3", *weights])
    return Trainer(cfg, _Loader(), tmp_path, torch.device("cpu"))


def difference_cue_batch(gen: torch.Generator, head: str, shuffle_labels: bool = False) -> dict:
    """View 1 = grey g, view 2 = g + label·δ (g ~ U(-0.5, 0.5) per sample); the other labels 0."""
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    grey = (torch.rand(BATCH, generator=gen) - 0.5).view(BATCH, 1, 1, 1, 1)
    view1 = grey.expand(BATCH, 3, FRAMES, CROP, CROP).contiguous()
    view2 = view1 + DELTA * labels.view(BATCH, 1, 1, 1, 1).float()
    if shuffle_labels:
        labels = labels[torch.randperm(BATCH, generator=gen)]
    zeros = torch.zeros(BATCH, dtype=torch.long)
    batch = {"view1": view1, "view2": view2, "spatial_label": zeros, "temporal_label": zeros,
             "speed_label": zeros, "rot1": zeros, "rot2": zeros.clone()}
    batch[LABEL_KEYS[head]] = labels
    return batch


def train_on_the_cue(tmp_path, head: str, shuffle_labels: bool) -> float:
    """Mean accuracy of `head` over the last LAST steps; each step's accuracy is measured on
    a fresh batch before the step's update, so it is held-out accuracy."""
    torch.set_num_threads(1)
    trainer = _trainer(tmp_path, head)
    gen = torch.Generator().manual_seed(7)
    column = len(LOSS_TERMS) + ACCURACIES.index(head)
    accuracies = []
    for _ in range(STEPS):
        metrics, _ = trainer.train_step(difference_cue_batch(gen, head, shuffle_labels), LR)
        accuracies.append(metrics[column].item())
    return sum(accuracies[-LAST:]) / LAST


@pytest.mark.parametrize("head", ["temporal", "spatial"])
def test_a_pairwise_head_alone_learns_a_cue_that_is_only_in_the_views_difference(tmp_path, head):
    accuracy = train_on_the_cue(tmp_path, head, shuffle_labels=False)
    assert accuracy >= 0.45, f"{head} head: {accuracy:.3f} after {STEPS} steps on a view-difference cue (chance 0.2)"


def test_the_same_training_stays_at_chance_when_labels_do_not_match_their_rows(tmp_path):
    """The control: what the test above would see if rows and labels were mixed up."""
    accuracy = train_on_the_cue(tmp_path, "temporal", shuffle_labels=True)
    assert accuracy <= 0.35, f"temporal head learnt shuffled labels: {accuracy:.3f}"
