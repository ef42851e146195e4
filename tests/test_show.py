"""`python show.py` (over pipelines/show.py) draws what the loader yields, and captions the plan's labels."""

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cstp.config import load_config
import show as show_cli
from pipelines import show
from pipelines.lmdb_store import VideoMeta, read_metadata
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import make_pretrain_plan, plan_config_from
from tests.lmdb_fixtures import coded_video, write_lmdb

HEIGHT, WIDTH = 48, 64
LENGTHS = [40, 64, 20, 90, 33]
SEED, EPOCH, N = 3, 1, 3
OVERRIDES = ["plan.frames=4", "crop_size=16", "num_threads=1"]
# As show.py builds it from the run config (so it follows the config's plan defaults)
PLAN_CFG = plan_config_from(load_config(None, OVERRIDES)["plan"])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coded_db(tmp_path_factory):
    return str(write_lmdb(tmp_path_factory.mktemp("show") / "coded.lmdb",
                          [coded_video(n, HEIGHT, WIDTH) for n in LENGTHS]))


@pytest.fixture(scope="module")
def picture(coded_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("png") / "views.png"
    rc = show_cli.main(["--data", coded_db, "--n", str(N), "--out", str(out), "--device", "cpu",
                    "--epoch", str(EPOCH), "--seed", str(SEED), *OVERRIDES])
    assert rc == 0
    return out


def loader_batch(db):
    """The training loader's first N samples of EPOCH, built independently of show.py."""
    loader = PretrainLoader(db, PLAN_CFG, LoaderSettings(batch_size=N, num_threads=1, seed=SEED),
                            start_epoch=EPOCH)
    try:
        batch = {k: v.clone() for k, v in next(iter(loader)).items()}
    finally:
        loader.close()
    return batch


def test_picture_has_one_block_per_sample(picture):
    image = Image.open(picture)
    assert image.format == "PNG" and image.mode == "RGB"
    layout = show.Layout(PLAN_CFG)
    assert image.height == layout.height(N) == layout.header_h + N * layout.block_h
    assert image.width >= layout.outputs_w
    assert layout.shown == [0, 1, 2, 3] and layout.zoom == 4  # 128 // 16 = 8, capped at 4


def test_output_tiles_are_the_loader_output(picture, coded_db):
    pixels = np.asarray(Image.open(picture).convert("RGB"))
    batch = loader_batch(coded_db)
    layout = show.Layout(PLAN_CFG)
    for i in range(N):
        for view in (1, 2):
            # [-1, 1] -> 0..255, as training's "tf" normalisation inverted
            expected = np.clip(np.rint((batch[f"view{view}"][i].numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
            expected = expected.transpose(1, 2, 3, 0)  # (T, S, S, 3)
            for j, t in enumerate(layout.shown):
                left, top, right, bottom = layout.tile_box(i, view, j)
                tile = pixels[top:bottom, left:right]
                assert tile.shape == (16 * layout.zoom, 16 * layout.zoom, 3)
                np.testing.assert_array_equal(tile[::layout.zoom, ::layout.zoom], expected[t],
                                              err_msg=f"sample {i} view {view} frame {t}")
                # nearest-neighbour zoom: every pixel of a block is the same
                np.testing.assert_array_equal(tile, np.repeat(np.repeat(expected[t], layout.zoom, 0),
                                                              layout.zoom, 1))


def test_samples_carry_the_loader_labels_and_plans(coded_db):
    cfg = load_config(None, OVERRIDES + [f"seed={SEED}"])
    samples = show.load_samples(coded_db, PLAN_CFG, cfg, n=N, epoch=EPOCH, executor="reference")
    batch = loader_batch(coded_db)
    metas, _ = read_metadata(coded_db)
    for i, s in enumerate(samples):
        p = s.plan
        assert p.video_index == int(batch["video_index"][i])
        q = make_pretrain_plan(SEED, EPOCH, p.video_index, LENGTHS[p.video_index], HEIGHT, WIDTH, PLAN_CFG)
        assert (p.view1.box, p.view2.box, p.starts, p.stride) == (q.view1.box, q.view2.box, q.starts, q.stride)
        np.testing.assert_array_equal(p.view2.frames, q.view2.frames)
        assert s.labels == {k: int(batch[k][i]) for k in s.labels}
        assert show.label_mismatches(s) == []
        wrong = dataclasses.replace(s, labels={**s.labels, "rot1": (s.labels["rot1"] + 1) % 4})
        assert show.label_mismatches(wrong) == [f"rot1: loader {wrong.labels['rot1']} != plan {p.view1.rotation}"]
        assert s.meta == metas[p.video_index]


def test_caption_names_every_label_of_the_plan():
    seen = set()
    for video, frames in enumerate(LENGTHS):
        for epoch in range(4):
            p = make_pretrain_plan(SEED, epoch, video, frames, HEIGHT, WIDTH, PLAN_CFG)
            meta = show.VideoMeta(f"class{video % 2}/video{video:03d}", video % 2, frames, HEIGHT, WIDTH)
            text = "\n".join(show.caption_lines(p, meta, PLAN_CFG, ["class0", "class1"], position=video))
            s1, s2 = p.starts
            for needle in (
                    f"video {video} '{meta.name}'",
                    f"spatial label {p.spatial_label}: rate {PLAN_CFG.spatial_rates[p.spatial_label]:g}",
                    f"measured {p.spatial_overlap:.2f}",
                    f"temporal label {p.temporal_label}: rate {PLAN_CFG.temporal_rates[p.temporal_label]:g}",
                    f"measured {p.temporal_overlap:.2f}",
                    f"view1 window start {s1} stride {p.stride}",
                    f"view2 window start {s2} stride {p.stride}",
                    f"speed label {p.speed_label}: stride {PLAN_CFG.strides[p.speed_label]}",
                    f"rot1 {p.view1.rotation} = {90 * p.view1.rotation}° CCW",
                    f"rot2 {p.view2.rotation} = {90 * p.view2.rotation}° CCW",
                    f"flip1 {'yes' if p.view1.flip else 'no'}",
                    f"flip2 {'yes' if p.view2.flip else 'no'}"):
                assert needle in text, (needle, text)
            for view, name in ((p.view1, "view1"), (p.view2, "view2")):
                assert f"{name} {show.appearance_text(view)}" in text
                a = getattr(view, "appearance", None)
                if a is not None and a.strong:
                    assert show.appearance_text(view) != "none"
            seen.add((p.spatial_label > 0, p.temporal_label > 0, p.view1.rotation))
    assert len(seen) > 3  # the captions were checked on varied plans


def test_reference_executor_and_cli_without_the_model(coded_db, tmp_path):
    out = tmp_path / "ref.png"
    code = (
        "import sys; from show import main; "
        f"rc = main({['--data', coded_db, '--n', '2', '--out', str(out), '--executor', 'reference', *OVERRIDES]!r}); "
        "assert rc == 0, rc; "
        "assert not [m for m in sys.modules if m.startswith('cstp.models')], 'pipelines imported the model'")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and str(out) in run.stdout
    assert Image.open(out).height == show.Layout(PLAN_CFG).height(2)


def test_clear_errors(coded_db, tmp_path, capsys):
    assert show_cli.main(["--data", str(tmp_path / "missing.lmdb"), "--out", str(tmp_path / "x.png")]) == 2
    assert "LMDB not found" in capsys.readouterr().err
    assert show_cli.main(["--data", coded_db, "framez=3"]) == 2
    assert "did you mean 'frames'" in capsys.readouterr().err
    assert show_cli.main(["--data", coded_db, "--seed", "-1", "--out", str(tmp_path / "x.png")]) == 2
    assert "run.seed must be in [0, " in capsys.readouterr().err   # numpy's 'expected non-negative integer'
    for bad in (["--data", coded_db, "--n", "0"], ["--data", coded_db, "--executor", "tf"], ["--bogus"]):
        with pytest.raises(SystemExit) as exit_info:
            show_cli.main(bad)
        assert exit_info.value.code == 2
    import torch

    if not torch.cuda.is_available():
        assert show_cli.main(["--data", coded_db, "--device", "gpu", "--out", str(tmp_path / "x.png")]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_very_tall_or_very_wide_videos_draw_a_bounded_picture(tmp_path):
    """A 1-pixel-wide video (a 24 x 1536 frame) made the timeline bar end before it began
    (PIL ValueError); a 6000 x 24 one made the picture ~216,000 px wide (GBs of memory)."""
    db = write_lmdb(tmp_path / "odd.lmdb", [coded_video(8, 1536, 24), coded_video(8, 24, 6000)])
    out = tmp_path / "odd.png"
    assert show_cli.main(["--data", str(db), "--n", "2", "--out", str(out), "--device", "cpu", *OVERRIDES]) == 0
    with Image.open(out) as image:
        assert image.width == 2046 <= show.MAX_PICTURE_WIDTH   # was 3582: six 576-px source frames


def test_the_picture_is_at_most_2048_px_wide_and_keeps_aspect_where_it_fits():
    """Source frames: 144 px high with their aspect up to 2.2:1 (16:9 and 2.2:1 untouched), wider
    ones scaled down to 320 px wide; output tiles keep their size, fewer are drawn when 8 do not fit."""
    layout = show.Layout(PLAN_CFG)
    assert show.MAX_PICTURE_WIDTH == 2048 and show.MAX_SOURCE_WIDTH == 320
    for (width, height), drawn in {(1920, 1080): 256, (320, 144): 320, (640, 240): 320, (6000, 24): 320,
                                   (24, 1536): 2}.items():
        meta = VideoMeta(name="v", label=0, frames=8, height=height, width=width, fps=25.0, source="v.mp4")
        assert layout.source_width(meta) == drawn
        assert layout.sources_w(meta, PLAN_CFG.frames) + show.PAD <= show.MAX_PICTURE_WIDTH
    jpeg = io.BytesIO()
    Image.new("RGB", (6000, 24), (90, 90, 90)).save(jpeg, "JPEG")
    plan = make_pretrain_plan(SEED, 0, 0, 8, 24, 6000, PLAN_CFG)
    assert show.draw_source_frame(jpeg.getvalue(), plan, 1, show.SOURCE_HEIGHT).size == (320, 1)
    for crop, shown in {112: 8, 224: 8, 240: 7, 512: 3, 1024: 1}.items():
        layout = show.Layout(dataclasses.replace(PLAN_CFG, crop_size=crop, frames=16))
        assert (layout.tile, len(layout.shown)) == (crop, shown)
        assert layout.outputs_w + show.PAD <= show.MAX_PICTURE_WIDTH


def test_a_database_of_only_unreadable_videos_is_one_line(tmp_path, capsys):
    import lmdb

    from pipelines.lmdb_store import video_key

    db = write_lmdb(tmp_path / "bad.lmdb", [coded_video(8, HEIGHT, WIDTH) for _ in range(2)])
    env = lmdb.open(str(db), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for v in range(2):
            txn.delete(video_key(v))
    env.close()
    assert show_cli.main(["--data", str(db), "--out", str(tmp_path / "x.png"), "--device", "cpu", *OVERRIDES]) == 2
    assert "unreadable videos in a row" in capsys.readouterr().err


def test_the_picture_is_at_most_8192_px_high_drawing_fewer_samples(coded_db, tmp_path, capsys):
    """The height grew with --n and the crop size without bound (--n 5 at crop 700: 8668 px);
    now the first samples that fit are drawn, never smaller ones, and a message says so."""
    assert show.MAX_PICTURE_HEIGHT == 8192
    for crop, fit in {16: 17, 112: 14, 224: 10, 700: 4, 1024: 3}.items():
        layout = show.Layout(dataclasses.replace(PLAN_CFG, crop_size=crop))
        assert layout.samples_that_fit(100) == fit and layout.samples_that_fit(2) == 2
        assert layout.height(fit) <= show.MAX_PICTURE_HEIGHT < layout.height(fit + 1)
    out = tmp_path / "tall.png"
    assert show_cli.main(["--data", coded_db, "--n", "5", "--out", str(out), "--device", "cpu", "--seed", str(SEED),
                          "plan.frames=4", "crop_size=700", "num_threads=1"]) == 0
    captured = capsys.readouterr()
    assert "show.py: 5 samples would make the picture 8668 px high (at most 8192); drawing the first 4\n" \
        in captured.err
    assert f"wrote {out} (" in captured.out and ", 4 samples)" in captured.out
    with Image.open(out) as image:
        assert image.height == 38 + 4 * 1726 <= show.MAX_PICTURE_HEIGHT
