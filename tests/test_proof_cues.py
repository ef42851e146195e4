"""The proof dataset's pairwise cues are learnable by the reference's own head.

The temporal and spatial overlap heads read concat(y1, y2) through Linear → BN → ReLU →
Linear (the reference's head). Whether such a head can learn a pair label depends on how the
data codes it, and the first proof dataset got this wrong: its clock was a blue level rising
over the whole video, and this test gave it temporal 0.354 against a majority rate of 0.240
(the hue clock that replaced it: 0.510; docs/proof.md). On the current data (four shapes that
change brightness only) and plan (24-px crops): temporal 0.523 (majority 0.240), spatial 0.497
(majority 0.373); at 32 px 0.513 and 0.477; grey shapes, which covered the colour code, gave
spatial 0.458 at 32 px and failed. So this test gives
the reference head per-view colour statistics of real PretrainLoader batches of proof videos
(the proof recipe's plan) and asks it to beat the majority rate clearly on held-out samples;
with the labels moved to another row it must not.
"""

from pathlib import Path

import pytest
import torch

from cstp.config import load_config
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import plan_config_from
from preprocessing import proof_data as pd
from preprocessing.demo_data import DemoVideo

from .lmdb_fixtures import write_lmdb
from .scripts_loader import load_script

pair_probe = load_script("pair_probe")

VIDEOS = 32                     # two batches of 16 per epoch
SAMPLES = 1536


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    plans = [DemoVideo(pd.CLASSES[i % 6], i % 6, i // 6, pd.WIDTH, pd.HEIGHT, pd.FRAMES, 0) for i in range(VIDEOS)]
    db = write_lmdb(tmp_path_factory.mktemp("proof_cues") / "db", [list(pd.render_proof_video(v)) for v in plans],
                    names=[v.relative_path for v in plans], labels=[v.label for v in plans])
    # configs/proof.yaml's plan (8 frames, 24-px crops, first box area <= 0.3, no colour jitter)
    cfg = plan_config_from(load_config(str(Path(__file__).resolve().parents[1] / "configs" / "proof.yaml"))["plan"])
    loader = PretrainLoader(str(db), cfg, LoaderSettings(batch_size=16, num_threads=2, seed=11))
    batches = []
    while sum(len(b["temporal_label"]) for b in batches) < SAMPLES:
        batches.extend(loader)
    loader.close()
    out = {k: torch.cat([b[k] for b in batches])[:SAMPLES] for k in ("view1", "view2", "temporal_label",
                                                                        "spatial_label")}
    out["stats1"], out["stats2"] = view_statistics(out["view1"]), view_statistics(out["view2"])
    return out


def view_statistics(view: torch.Tensor) -> torch.Tensor:
    """Per view: mean colour, mean spatial spread per channel and the colour's change per frame
    (9 numbers that a 3-D CNN can compute; rotation and flip do not change them)."""
    v = view.float()
    mean = v.mean(dim=(2, 3, 4))
    spread = v.std(dim=(3, 4)).mean(2)
    per_frame = v.mean(dim=(3, 4))                                            # (B, 3, T)
    t = torch.arange(per_frame.shape[2], dtype=torch.float32) - (per_frame.shape[2] - 1) / 2
    slope = (per_frame * t).sum(2) / (t * t).sum()
    return torch.cat([mean, spread, slope], 1)


def held_out_accuracy(stats1, stats2, labels, steps=2000, seed=0) -> tuple[float, float]:
    """(accuracy, majority rate) of the reference head trained with SGD on 80 % of the pairs."""
    n = len(labels)
    train = int(0.8 * n)
    both = torch.cat([stats1[:train], stats2[:train]])
    mean, std = both.mean(0), both.std(0) + 1e-6
    x = torch.cat([(stats1 - mean) / std, (stats2 - mean) / std], 1)
    return pair_probe.fresh_head_accuracy(x, labels, steps=steps, seed=seed, hidden=256, lr=0.01, standardise=False)


@pytest.mark.parametrize("task, margin", [("temporal_label", 0.15), ("spatial_label", 0.10)])
def test_reference_head_learns_the_pair_label_from_per_view_colour(samples, task, margin):
    torch.set_num_threads(1)
    labels = samples[task]
    accuracy, majority = held_out_accuracy(samples["stats1"], samples["stats2"], labels)
    assert accuracy >= majority + margin, (task, accuracy, majority)
    # the same statistics with view 2 taken from another row carry no pair label
    moved = torch.roll(samples["stats2"], 1, 0)
    accuracy_moved, majority = held_out_accuracy(samples["stats1"], moved, labels)
    assert accuracy_moved <= majority + 0.06, (task, accuracy_moved, majority)
