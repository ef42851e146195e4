"""The proof dataset (preprocessing/proof_data.py): fixed speeds, the documented classes,
and cues that make each pretext label observable."""

from __future__ import annotations


import numpy as np
import pytest

from preprocessing.ffmpeg_tools import locate

from preprocessing import proof_data as pd
from preprocessing.demo_data import DemoVideo


def video(class_name: str, index: int = 0, seed: int = 0) -> DemoVideo:
    return DemoVideo(class_name, pd.CLASSES.index(class_name), index, pd.WIDTH, pd.HEIGHT, pd.FRAMES, seed)


def best_shift(a: np.ndarray, b: np.ndarray, reach: int) -> tuple[int, int]:
    """Integer (dx, dy) with b(x, y) ≈ a(x - dx, y - dy), by exhaustive search."""
    best, errors = None, {}
    h, w = a.shape
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            a_part = a[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            b_part = b[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
            errors[(dx, dy)] = float(np.mean((a_part - b_part) ** 2))
    best = min(errors, key=errors.get)
    return best


def test_classes_are_the_documented_six_and_no_pretext_label():
    assert pd.CLASSES == ("blink", "glide", "orbit", "pulse", "spin", "swing")
    for name in pd.CLASSES:
        assert name in pd.__doc__
    videos = pd.plan_proof_videos(3, seed=0)
    assert [v.label for v in videos] == [i for i in range(6) for _ in range(3)]
    assert all((v.width, v.height, v.frames) == (pd.WIDTH, pd.HEIGHT, pd.FRAMES) for v in videos)


@pytest.mark.parametrize("index", range(4))
def test_background_moves_at_exactly_the_fixed_speed(index):
    scene = pd.ProofScene(video("pulse", index))
    t = np.arange(0, pd.FRAMES, 7)
    ox, oy = scene.background_offset(t)
    np.testing.assert_allclose(np.hypot(ox, oy), pd.BACKGROUND_SPEED * t, rtol=0, atol=1e-9)
    # and the rendered texture really moves by that much: 16 frames -> 8 px
    frames = scene.texture(np.array([40, 56]))
    dx, dy = best_shift(frames[0], frames[1], reach=11)
    expected = pd.BACKGROUND_SPEED * 16
    assert abs(np.hypot(dx, dy) - expected) <= 1.0
    assert abs(dx - expected * np.cos(scene.direction)) <= 1.0 and abs(dy - expected * np.sin(scene.direction)) <= 1.0


def test_fastest_stride_does_not_alias_the_texture():
    # stride 8 of the playback rates moves the texture 8 x speed per sampled frame: below half a wavelength
    assert 8 * pd.BACKGROUND_SPEED < min(pd.WAVELENGTHS) / 2


def test_foreground_motions_have_their_fixed_rates():
    t = np.arange(pd.FRAMES)
    glide = pd.ProofScene(video("glide", 1)).shapes[0]
    cx, cy, *_ = glide.state(t)
    steps = np.hypot(np.diff(cx), np.diff(cy))
    # the speed is FOREGROUND_SPEED except at a bounce
    assert np.mean(np.isclose(steps, pd.FOREGROUND_SPEED, atol=1e-9)) > 0.9
    orbit = pd.ProofScene(video("orbit", 2)).shapes[1]
    cx, cy, *_ = orbit.state(t)
    np.testing.assert_allclose(np.hypot(cx - orbit.cx0, cy - orbit.cy0), pd.ORBIT_RADIUS)
    np.testing.assert_allclose(cx[pd.ORBIT_PERIOD], cx[0], atol=1e-9)
    spin = pd.ProofScene(video("spin", 0)).shapes[2]
    _, _, angle, *_ = spin.state(t)
    np.testing.assert_allclose(np.abs(angle[pd.SPIN_PERIOD] - angle[0]), 2 * np.pi)
    blink = pd.ProofScene(video("blink", 0)).shapes[3]
    visible = blink.state(np.arange(pd.BLINK_PERIOD * 2))[4]
    assert visible.sum() == pd.BLINK_PERIOD  # shown half the time
    pulse = pd.ProofScene(video("pulse", 0)).shapes[0]
    scale = pulse.state(t)[3]
    assert scale.max() == pytest.approx(1 + pd.PULSE_AMPLITUDE, abs=0.01)
    # still classes do not move
    for name in ("blink", "pulse", "spin"):
        for shape in pd.ProofScene(video(name, 3)).shapes:
            cx, cy, *_ = shape.state(t)
            assert np.ptp(cx) == 0 and np.ptp(cy) == 0


def test_every_shape_of_a_video_moves_the_class_way_and_stays_inside():
    t = np.arange(pd.FRAMES)
    kinds = set()
    for name in pd.CLASSES:
        for i in range(5):
            scene = pd.ProofScene(video(name, i))
            assert len(scene.shapes) == pd.SHAPES_PER_VIDEO
            for shape in scene.shapes:
                assert shape.class_name == name
                kinds.add((name, shape.kind))
                cx, cy, *_ = shape.state(t)
                assert cx.min() >= 0 and cx.max() <= pd.WIDTH and cy.min() >= 0 and cy.max() <= pd.HEIGHT
            # the shapes of one video are drawn independently: not four copies of one
            assert len({(s.cx0, s.cy0, s.phase) for s in scene.shapes}) == pd.SHAPES_PER_VIDEO
    # every kind of shape appears in every class (but spin: a spinning disc would look still)
    assert kinds == {(name, kind) for name in pd.CLASSES for kind in pd.SHAPES} - {("spin", "disc")}


def test_shapes_change_brightness_only_and_the_texture_is_shared():
    t = np.arange(0, pd.FRAMES, 5)
    scene = pd.ProofScene(video("orbit", 0))
    assert {shape.polarity for shape in scene.shapes} <= {-1.0, 1.0}
    background = np.clip(scene.background(t), 0, 1)
    frames = scene.render(t).astype(np.float64) / 255
    covered = np.max([shape.coverage(t) for shape in scene.shapes], axis=0) > 0.99
    assert covered.mean() > 0.05                       # the shapes are drawn, lighter or darker ...
    change = frames - background
    assert np.abs(change).max(axis=3)[covered].mean() > 0.2
    # ... by the same amount in R, G and B wherever nothing clips: the colour under them stays
    unclipped = covered & (frames > 1 / 255).all(axis=3) & (frames < 254 / 255).all(axis=3)
    assert unclipped.mean() > 0.03
    assert np.ptp(change, axis=3)[unclipped].max() < 0.01

    def hue(rgb):
        u = (rgb[..., 0] - rgb[..., 1]).mean(axis=(1, 2))
        v = (rgb[..., 0] + rgb[..., 1] - 2 * rgb[..., 2]).mean(axis=(1, 2)) / np.sqrt(3)
        return np.arctan2(v, u)
    np.testing.assert_allclose(np.angle(np.exp(1j * (hue(frames) - hue(background)))), 0, atol=0.05)
    # the texture is the same in every video (only its direction of motion differs)
    other = pd.ProofScene(video("swing", 7))
    np.testing.assert_array_equal(other.wave_kx, scene.wave_kx)
    np.testing.assert_array_equal(other.wave_phase, scene.wave_phase)
    assert other.direction != scene.direction


def test_the_map_gives_position_and_the_hue_gives_time():
    scene = pd.ProofScene(video("blink", 0))
    frames = pd.render_proof_video(video("blink", 0)).astype(np.float64) / 255
    grey = frames.mean(axis=3)                                   # (T, H, W)
    chroma_u = (frames[..., 0] - frames[..., 1]) / np.sqrt(2)
    chroma_v = (frames[..., 0] + frames[..., 1] - 2 * frames[..., 2]) / np.sqrt(6)
    saturation = np.hypot(chroma_u, chroma_v)
    # the grey level grows to the right, the saturation downwards (position and handedness cues)
    columns = grey.mean(axis=(0, 1))
    assert columns[-8:].mean() - columns[:8].mean() > 0.5 * (pd.LUMA_HIGH - pd.LUMA_LOW)
    rows = saturation.mean(axis=(0, 2))
    assert rows[-8:].mean() - rows[:8].mean() > 0.5 * (pd.CHROMA_BOTTOM - pd.CHROMA_TOP)
    # the frame's mean colour turns by exactly one CLOCK_PERIOD-th of a turn per frame
    hue = np.unwrap(np.arctan2(chroma_v.mean(axis=(1, 2)), chroma_u.mean(axis=(1, 2))))
    np.testing.assert_allclose(np.diff(hue), 2 * np.pi / pd.CLOCK_PERIOD, atol=0.02)
    np.testing.assert_allclose(np.angle(np.exp(1j * (hue[0] - scene.clock(0)))), 0, atol=0.05)
    # the clock is the only colour: frames one period apart have the same mean colour
    np.testing.assert_allclose(frames[pd.CLOCK_PERIOD].mean(axis=(0, 1)), frames[0].mean(axis=(0, 1)), atol=0.02)


def test_rendering_is_deterministic_and_videos_differ():
    a = pd.render_proof_video(video("orbit", 0))
    assert a.shape == (pd.FRAMES, pd.HEIGHT, pd.WIDTH, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, pd.render_proof_video(video("orbit", 0)))
    assert np.abs(a.astype(int) - pd.render_proof_video(video("orbit", 1))).mean() > 10


@pytest.mark.skipif(locate("ffmpeg") is None, reason="ffmpeg not installed")
def test_generate_writes_lists_and_videos(tmp_path):
    summary = pd.generate_proof_dataset(tmp_path, videos_per_class=3, seed=0, workers=1)
    assert summary["classes"] == list(pd.CLASSES) and summary["videos"] == 18
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(pd.CLASSES)
    train = (tmp_path / "train.txt").read_text().splitlines()
    test = (tmp_path / "test.txt").read_text().splitlines()
    assert len(train) == 12 and len(test) == 6 and not set(train) & set(test)
    for line in train + test:
        name, label = line.split()
        assert (tmp_path / "videos" / name).is_file() and name.startswith(pd.CLASSES[int(label)] + "/")


@pytest.mark.skipif(locate("ffmpeg") is None, reason="ffmpeg not installed")
def test_proof_data_command_makes_the_dataset_once_and_never_deletes_a_foreign_folder(tmp_path):
    """`python -m preprocessing proof-data`, the first step of `make demo`: it generates the
    dataset, does nothing when the folder already holds it, rebuilds one of another size (the
    LMDBs built from the old one go with it) and refuses a folder that is not a proof dataset."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def proof_data(out, *extra):
        return subprocess.run([sys.executable, "-m", "preprocessing", "proof-data", "--out", str(out),
                               "--workers", "1", *extra], cwd=root, capture_output=True, text=True, timeout=300)

    data = tmp_path / "proof"
    made = proof_data(data, "--videos-per-class", "2")
    assert made.returncode == 0, made.stderr
    assert "12 videos (6 train / 6 test)" in made.stdout
    assert json.loads((data / pd.STAMP).read_text()) == {"generator_version": pd.GENERATOR_VERSION,
                                                         "videos_per_class": 2, "seed": 0}
    first = sorted((data / "videos").rglob("*.mp4"))
    stamps = [p.stat().st_mtime_ns for p in first]
    again = proof_data(data, "--videos-per-class", "2")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert [p.stat().st_mtime_ns for p in first] == stamps              # nothing rewritten
    (data / "train.lmdb").mkdir()                                        # built from the old videos
    bigger = proof_data(data, "--videos-per-class", "3")
    assert bigger.returncode == 0 and "rebuilding" in bigger.stdout
    assert len(list((data / "videos").rglob("*.mp4"))) == 18 and not (data / "train.lmdb").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    refused = proof_data(mine)
    assert refused.returncode == 2 and "not a proof dataset" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["precious.txt"]
    assert proof_data(tmp_path / "x", "--videos-per-class", "1").returncode == 2   # one video cannot be split
