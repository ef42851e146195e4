"""The frames graph (data.graph=frames: one decoder over the B·2·T frames of B samples)
gives the views graph's batches: same labels, same pixels, for both decode modes and
with every appearance op switched on (jitter, grey, blur), across an epoch boundary."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.frames_graph import FRAMES_OUTPUTS, frames_to_views
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from tests.lmdb_fixtures import coded_video, write_lmdb

# The same ops on the same frames: the same bytes (measured: max difference 0.0 on both
# decode modes). Exact equality is asserted.
TOLERANCE = 0.0


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    rng = np.random.default_rng(4)
    smooth = [[np.asarray(Image.fromarray(f).resize((64, 48), Image.BICUBIC))
               for f in rng.integers(0, 255, size=(n, 6, 8, 3)).astype(np.uint8)] for n in (20, 33, 26)]
    coded = [coded_video(n, 48, 64) for n in (17, 40, 29)]
    return str(write_lmdb(tmp_path_factory.mktemp("frames") / "f.lmdb", smooth + coded))


def epochs(db, graph, decode, cfg, n=2, workers=0):
    settings = LoaderSettings(batch_size=3, num_threads=1, seed=7, decode=decode, graph=graph, workers=workers)
    loader = PretrainLoader(db, cfg, settings)
    out = [[{k: v.clone() for k, v in b.items()} for b in loader] for _ in range(n)]
    loader.close()
    return out


@pytest.mark.parametrize("decode", ["roi", "full"])
def test_frames_graph_gives_the_views_graphs_batches(db, decode):
    cfg = PlanConfig(frames=4, crop_size=24, strong_prob=1.0, jitter_prob=1.0, grey_prob=0.5, blur_prob=0.5)
    views, frames = epochs(db, "views", decode, cfg), epochs(db, "frames", decode, cfg)
    compared = 0
    for epoch_v, epoch_f in zip(views, frames):
        assert len(epoch_v) == len(epoch_f) == 2
        for a, b in zip(epoch_v, epoch_f):
            assert set(a) == set(b)
            for key in a:
                assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
                if key.startswith("view"):
                    assert float((a[key] - b[key]).abs().max()) <= TOLERANCE, key
                    compared += 1
                else:
                    assert a[key].tolist() == b[key].tolist(), key
    assert compared == 8
    # not vacuous: the two epochs differ, and so do the views
    assert not torch.equal(views[0][0]["view1"], views[1][0]["view1"])


def test_frames_graph_with_forked_workers(db):
    cfg = PlanConfig(frames=4, crop_size=24)
    a, b = epochs(db, "views", "roi", cfg, n=1), epochs(db, "frames", "roi", cfg, n=1, workers=2)
    for x, y in zip(a[0], b[0]):
        assert float((x["view2"] - y["view2"]).abs().max()) <= TOLERANCE
        assert x["video_index"].tolist() == y["video_index"].tolist()


def test_frames_to_views_reshapes_frame_order_into_views():
    b, t = 2, 3
    # frame k of sample i, view v: value 100·i + 10·v + k in every pixel
    values = torch.tensor([100 * i + 10 * v + k for i in range(b) for v in (1, 2) for k in range(t)], dtype=torch.float)
    batch = {"frames": values[:, None, None, None].expand(b * 2 * t, 3, 2, 2).clone()}
    batch.update({name: torch.arange(b * 2 * t) // (2 * t) for name in FRAMES_OUTPUTS[1:]})
    out = frames_to_views(batch, t)
    assert out["view1"].shape == (b, 3, t, 2, 2)
    assert out["view1"][1, 0, :, 0, 0].tolist() == [110, 111, 112]
    assert out["view2"][0, 2, :, 1, 1].tolist() == [20, 21, 22]
    assert out["video_index"].tolist() == [0, 1]


def test_frames_graph_recovers_from_a_decoder_fault_like_the_views_graph(tmp_path):
    """A frame the decoder fails on inside the frames graph is located with the views graph
    (one sample at a time, same decoder and boxes) and replaced: both graphs read the same
    batches over two epochs, the damaged video never among them."""
    from pipelines.pretrain_pipeline import PRETRAIN_OUTPUTS
    from tests.lmdb_fixtures import encode_jpeg
    from tests.test_data_faults import CFG, DAMAGED, H, W, batches_of, damage_header, ids, put

    path = str(write_lmdb(tmp_path / "rot.lmdb", [coded_video(24, H, W) for _ in range(16)]))
    put(path, DAMAGED, [damage_header(encode_jpeg(f)) for f in coded_video(24, H, W)])
    views = batches_of(PretrainLoader(path, CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0)), 2)
    frames = batches_of(PretrainLoader(path, CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0,
                                                                 graph="frames")), 2)
    assert len(frames) == 8 and DAMAGED not in ids(frames)
    assert sum(int((b["substituted"] > 0).sum()) for b in frames) == 2   # once per epoch
    for a, b in zip(views, frames, strict=True):
        for key in PRETRAIN_OUTPUTS:
            assert torch.equal(a[key], b[key]), key
