"""The LMDB path's two JPEG decode modes (LoaderSettings.decode, config data.decode) give
the same views: "roi" (decoders.image_slice of the planned box) and "full" (decoders.image
of the whole frame, then fn.slice of the box). CPU backend; scripts/gpu_check.sh times
both on a GPU, where they run on different decoder engines."""

import numpy as np
import pytest
from PIL import Image

from cstp.config import ConfigError, load_config
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig, make_pretrain_plan
from tests.lmdb_fixtures import write_lmdb
from tests.test_pretrain_pipeline import EXACT, HEIGHT, WIDTH, coded_db, expected_view, to_pixels  # noqa: F401

# Measured on the CPU (libjpeg-turbo, DALI 2.4): both fixtures come out bit-identical in the
# two modes (mean and max difference 0). The bounds leave room for a decoder whose ROI path
# upsamples chroma differently at the box edge: max 2 levels (coded frames, 4:4:4), mean 0.5
# levels (smooth frames, resampled boxes, strong augmentation). A wrong box or frame in one
# mode differs by tens of levels.
CODED_MAX_DIFF = 2.0
SMOOTH_MEAN_DIFF = 0.5


def batches(path, cfg, decode, seed=3, batch_size=4):
    loader = PretrainLoader(str(path), cfg, LoaderSettings(batch_size=batch_size, num_threads=1, seed=seed,
                                                           decode=decode))
    out = [{k: v.clone() for k, v in b.items()} for b in loader]
    loader.close()
    return out


def test_full_decode_executes_the_plan_like_roi_decode(coded_db):  # noqa: F811
    path, lengths = coded_db
    roi, full = batches(path, EXACT, "roi"), batches(path, EXACT, "full")
    assert len(roi) == len(full) == 3
    for a, b in zip(roi, full):
        assert a["video_index"].tolist() == b["video_index"].tolist()
        for name in ("spatial_label", "temporal_label", "speed_label", "rot1", "rot2"):
            assert a[name].tolist() == b[name].tolist()
        for i, video in enumerate(b["video_index"].tolist()):
            plan = make_pretrain_plan(3, 0, video, lengths[video], HEIGHT, WIDTH, EXACT)
            for name, vp in (("view1", plan.view1), ("view2", plan.view2)):
                got = to_pixels(b[name][i])
                # the oracle, independent of the ROI decoder: the analytic coded frames
                assert np.abs(got - expected_view(vp)).max() <= 3 + 1e-3, (name, video, vp)
                assert np.abs(got - to_pixels(a[name][i])).max() <= CODED_MAX_DIFF, (name, video)


def test_full_and_roi_decode_agree_on_resampled_boxes_with_the_strong_augmentation(tmp_path):
    rng = np.random.default_rng(1)
    videos = [[np.asarray(Image.fromarray(f).resize((WIDTH, HEIGHT), Image.BICUBIC))
               for f in rng.integers(0, 255, size=(24, 6, 8, 3)).astype(np.uint8)] for _ in range(4)]
    path = write_lmdb(tmp_path / "smooth.lmdb", videos)
    cfg = PlanConfig(frames=4, crop_size=24, strong_prob=1.0, jitter_prob=1.0, grey_prob=0.5, blur_prob=0.5)
    roi, full = batches(path, cfg, "roi", seed=2), batches(path, cfg, "full", seed=2)
    levels = lambda view: view.numpy() * 127.5 + 127.5  # noqa: E731
    diffs = []
    for a, b in zip(roi, full):
        for name in ("view1", "view2"):
            diff = np.abs(levels(a[name]) - levels(b[name]))
            assert diff.mean() <= SMOOTH_MEAN_DIFF and diff.max() <= 8, (name, diff.mean(), diff.max())
            diffs.append(diff.mean())
        # not trivially equal inputs: the two views differ from each other by far more
        assert np.abs(levels(a["view1"]) - levels(a["view2"])).mean() > 10 * SMOOTH_MEAN_DIFF
    print("mean |roi - full| per view batch:", [round(float(d), 3) for d in diffs])


def test_a_bad_decode_mode_is_refused(coded_db):  # noqa: F811
    path, _ = coded_db
    with pytest.raises(ValueError, match="decode must be one of roi, full"):
        PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, num_threads=1, decode="nvjpeg"))
    with pytest.raises(ConfigError, match="data.decode must be roi or full"):
        load_config(None, ["data.decode=nvjpeg"])
    assert load_config(None, ["decode=full"])["data"]["decode"] == "full"
