"""Rows of the loader's batches: each row's two views and its labels belong together.

On proof videos (preprocessing/proof_data.py) the blue channel is a clock: each frame's
mean blue is its time. So, per row of a real PretrainLoader batch, the blue difference
between view 2 and view 1 must be the temporal shift the row's labels imply
(int((1 - rate) · (T - 1) · stride) frames, pipelines/plan.py), and the blue slope within a
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
# one frame of clock in the loader's [-1, 1] pixels: CLOCK_RATE per frame, x 0.8 in the frame
BLUE_PER_FRAME = pd.CLOCK_RATE * 0.8 * 2


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


def blue_level_and_slope(view: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: mean blue over the view, and its rise per frame of the view."""
    blue = view[:, 2].float().mean(dim=(2, 3)).numpy()            # (B, T)
    t = np.arange(blue.shape[1]) - (blue.shape[1] - 1) / 2
    return blue.mean(1), (blue * t).sum(1) / (t * t).sum()


@pytest.mark.parametrize("graph", ["views", "frames"])
def test_each_rows_views_differ_by_the_time_its_labels_say(db, graph):
    r = rows(db, graph)
    level1, slope1 = blue_level_and_slope(r["view1"])
    level2, slope2 = blue_level_and_slope(r["view2"])
    shift_seen = np.abs(level2 - level1) / BLUE_PER_FRAME          # frames between the windows
    stride_seen = (slope1 + slope2) / 2 / BLUE_PER_FRAME           # frames per step of a window
    shift, stride = r["shift"].numpy(), r["stride"].numpy()
    assert len(shift) == 24 and len(set(shift.tolist())) >= 4      # enough different shifts to tell
    # each row's pixels say its own labels; the stride and the shift in most rows (a moving
    # shape in a small crop shifts the blue level of a view now and then) ...
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
