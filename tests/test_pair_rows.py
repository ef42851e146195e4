"""Rows of the loader's batches: each row's two views and its labels belong together.

On proof videos (preprocessing/proof_data.py) the hue is a clock: each frame's mean colour
turns by 2π / CLOCK_PERIOD per frame. So, per row of a real PretrainLoader batch, the hue
difference between view 2 and view 1 must be the temporal shift the row's labels imply
(int((1 - rate) · (T - 1) · stride) frames, pipelines/plan.py), and the hue turn within a
view must be the row's stride. A row of view 1, view 2 and labels taken from different
samples breaks both; the pairwise heads cannot learn from such rows (tests/test_pairwise_heads.py
shows they learn from aligned ones). Checked for both graphs (data.graph views and frames).
"""

import numpy as np
import pytest
import torch

from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig, temporal_shift
from preprocessing import proof_data as pd
from preprocessing.demo_data import DemoVideo

from .lmdb_fixtures import write_lmdb

FRAMES = 8
HUE_PER_FRAME = 2 * np.pi / pd.CLOCK_PERIOD       # radians of hue per frame of video


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    videos = [pd.render_proof_video(DemoVideo(name, pd.CLASSES.index(name), 0, pd.WIDTH, pd.HEIGHT, pd.FRAMES, 0))
              for name in pd.CLASSES[:4]]
    return str(write_lmdb(tmp_path_factory.mktemp("proof") / "db", [list(v) for v in videos],
                          names=[f"{n}/v0" for n in pd.CLASSES[:4]], labels=[0, 1, 2, 3]))


def rows(db: str, graph: str) -> dict:
    cfg = PlanConfig(frames=FRAMES, crop_size=32, max_area=0.3, strong_prob=0.0)   # no colour jitter
    loader = PretrainLoader(db, cfg, LoaderSettings(batch_size=4, num_threads=1, seed=5, graph=graph))
    batches = [b for _ in range(6) for b in loader]
    loader.close()
    out = {k: torch.cat([b[k] for b in batches]) for k in ("view1", "view2", "temporal_label", "speed_label")}
    strides = torch.tensor(cfg.strides)[out["speed_label"]]
    rates = [cfg.temporal_rates[i] for i in out["temporal_label"].tolist()]
    out["shift"] = torch.tensor([temporal_shift(r, (FRAMES - 1) * int(s)) for r, s in zip(rates, strides)])
    out["stride"] = strides
    return out


def hue_and_turn(view: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the view's mean hue (radians), and its turn per frame of the view. Hue is the
    angle of the mean colour in the plane orthogonal to grey (rotation, flip and the loader's
    pixel offset and scale do not change it)."""
    rgb = view.float().mean(dim=(3, 4)).numpy()                    # (B, 3, T)
    u = (rgb[:, 0] - rgb[:, 1]) / np.sqrt(2)
    v = (rgb[:, 0] + rgb[:, 1] - 2 * rgb[:, 2]) / np.sqrt(6)
    angle = np.unwrap(np.arctan2(v, u), axis=1)                    # (B, T)
    t = np.arange(angle.shape[1]) - (angle.shape[1] - 1) / 2
    return angle.mean(1), (angle * t).sum(1) / (t * t).sum()


@pytest.mark.parametrize("graph", ["views", "frames"])
def test_each_rows_views_differ_by_the_time_its_labels_say(db, graph):
    r = rows(db, graph)
    hue1, turn1 = hue_and_turn(r["view1"])
    hue2, turn2 = hue_and_turn(r["view2"])
    difference = np.angle(np.exp(1j * (hue2 - hue1)))              # wrapped; shifts stay under half a turn
    shift_seen = np.abs(difference) / HUE_PER_FRAME                # frames between the windows
    stride_seen = (turn1 + turn2) / 2 / HUE_PER_FRAME              # frames per step of a window
    shift, stride = r["shift"].numpy(), r["stride"].numpy()
    assert len(shift) == 24 and len(set(shift.tolist())) >= 4      # enough different shifts to tell
    # each row's pixels say its own labels; the stride and the shift in most rows (a moving
    # shape in a small crop dilutes a view's colour now and then) ...
    nearest = 2.0 ** np.clip(np.round(np.log2(np.maximum(stride_seen, 0.1))), 0, 3)   # strides 1, 2, 4, 8
    assert (nearest == stride).mean() >= 0.9, (stride_seen.round(2), stride)
    fits = np.abs(shift_seen - shift) <= 1.0 + 0.1 * shift
    assert fits.mean() >= 0.8, (shift_seen.round(1), shift)
    assert np.corrcoef(shift_seen, shift)[0, 1] >= 0.9
    # ... and another row's labels do not fit them (what a row mix-up would give)
    rolled = np.roll(shift, 1)
    assert (np.abs(shift_seen - rolled) <= 1.0 + 0.1 * rolled).mean() <= 0.5
    assert np.corrcoef(shift_seen, rolled)[0, 1] <= 0.5
    assert (nearest == np.roll(stride, 1)).mean() <= 0.6
