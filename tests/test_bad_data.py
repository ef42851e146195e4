"""Bad entries in an LMDB never stop a run: each is replaced by another sample, chosen
deterministically, counted, and logged once; a corrupt JPEG never reaches DALI."""

import logging

import lmdb
import numpy as np
import pytest

from pipelines import lmdb_store as fmt
from pipelines.lmdb_store import jpeg_problem
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from tests.lmdb_fixtures import coded_video, encode_jpeg, write_lmdb

CFG = PlanConfig(frames=4, crop_size=32)
H, W = 48, 64


def corrupt(path, video, value):
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        if value is None:
            txn.delete(fmt.video_key(video))
        else:
            txn.put(fmt.video_key(video), value)
    env.close()


@pytest.fixture()
def damaged_db(tmp_path):
    path = write_lmdb(tmp_path / "damaged.lmdb", [coded_video(24, H, W) for _ in range(16)])
    good = [encode_jpeg(f) for f in coded_video(24, H, W)]
    corrupt(path, 1, None)                                                 # missing entry
    corrupt(path, 3, fmt.pack([g[: len(g) // 2] for g in good]))           # truncated JPEGs
    corrupt(path, 5, fmt.pack([b"not a jpeg at all" * 10] * 24))           # foreign bytes
    corrupt(path, 7, fmt.pack(good[:3]))                                   # fewer frames than the metadata
    corrupt(path, 9, b"\xc1\xc1 garbage that is not msgpack")              # undecodable entry
    small = encode_jpeg(coded_video(1, H // 2, W // 2)[0])
    corrupt(path, 11, fmt.pack([small] * 24))                              # wrong frame size
    return str(path)


BAD = {1, 3, 5, 7, 9, 11}


def run_epochs(path, epochs=3):
    loader = PretrainLoader(path, CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0))
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append((batch["video_index"].tolist(), batch["substituted"].tolist(),
                        batch["view1"].sum().item()))
    return out


def test_bad_videos_are_replaced_counted_and_logged_once(damaged_db, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.sources")
    first = run_epochs(damaged_db)
    assert len(first) == 12  # 16 videos / batch 4 x 3 epochs: every step ran
    videos = [v for ids, _, _ in first for v in ids]
    substituted = [s for _, subs, _ in first for s in subs]
    assert not BAD & set(videos)
    # every bad video is drawn once per epoch: 6 per epoch, 18 in all (a replacement may itself be bad)
    assert sum(1 for s in substituted if s > 0) == 18
    warnings = [r.getMessage() for r in caplog.records if "skipping video" in r.getMessage()]
    assert len(warnings) == len(BAD)
    for video, reason in [(1, "KeyError"), (3, "truncated"), (5, "JPEG marker"), (7, "IndexError"),
                          (11, "metadata says 64x48")]:
        assert any(f"skipping video {video} " in w and reason in w for w in warnings), (video, warnings)
    # replacements are deterministic
    assert run_epochs(damaged_db) == first


def test_a_database_of_only_bad_videos_stops_with_a_clear_message(tmp_path):
    path = write_lmdb(tmp_path / "all_bad.lmdb", [coded_video(10, H, W) for _ in range(4)])
    for v in range(4):
        corrupt(path, v, None)
    loader = PretrainLoader(str(path), CFG, LoaderSettings(batch_size=2, num_threads=1))
    with pytest.raises(Exception, match="unreadable videos in a row"):
        next(iter(loader))


@pytest.mark.parametrize("workers", [0, 1])
def test_train_over_a_broken_database_stops_in_one_line(tmp_path, capsys, workers):
    """It was a two-part traceback (a bare Exception from DALI's worker with data.workers=1)."""
    import train

    path = write_lmdb(tmp_path / "all_bad.lmdb", [coded_video(10, H, W) for _ in range(4)])
    for v in range(4):
        corrupt(path, v, None)
    assert train.main(["--out", str(tmp_path / "run"), f"data.path={path}", "device=cpu", "batch_size=2",
                       "plan.frames=4", "crop_size=16", "model.width=0.0625", "proj_hidden=16", "proj_dim=8",
                       "progress=false", "tensorboard=false", "num_threads=1", f"data.workers={workers}"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"train.py: stopped: 16 unreadable videos in a row in {path} (the "
                                            "database looks broken: rebuild it with `python -m preprocessing "
                                            "build-lmdb`)")
    assert "Traceback" not in err


def test_a_blocklist_naming_every_video_is_refused_at_open(tmp_path):
    path = write_lmdb(tmp_path / "db.lmdb", [coded_video(10, H, W) for _ in range(3)])
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("".join(f"{m.name}\tbad\n" for m in fmt.read_metadata(str(path))[0]))
    with pytest.raises(ValueError, match="names every one of the 3 videos"):
        PretrainLoader(str(path), CFG, LoaderSettings(batch_size=2, num_threads=1), blocklist=str(blocklist))


def test_jpeg_checks():
    good = encode_jpeg(coded_video(1, H, W)[0])
    assert jpeg_problem(good, H, W) is None
    assert "truncated" in jpeg_problem(good[:-40], H, W)
    assert "too short" in jpeg_problem(b"\xff\xd8", H, W)
    assert "marker" in jpeg_problem(b"x" * 100, H, W)
    assert "metadata says" in jpeg_problem(good, H + 1, W)
    header_broken = good[:2] + b"\xff\xc0\x00\x02" + np.zeros(100, np.uint8).tobytes() + good[-2:]
    assert jpeg_problem(header_broken, H, W) is not None


def rewrite_meta(path, edit):
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(fmt.META_KEY, fmt.pack(edit(fmt.unpack(txn.get(fmt.META_KEY)))))
    env.close()


@pytest.mark.parametrize("edit, message", [
    (lambda r: {**r, "frames": 0}, "has frames 0, not an integer in [1, "),
    (lambda r: {**r, "height": 0}, "has height 0"),
    (lambda r: {**r, "width": 10 ** 9}, "has width 1000000000"),
    (lambda r: {**r, "label": -1}, "has label -1"),
    (lambda r: {**r, "label": 10 ** 11}, "has label 100000000000"),
    (lambda r: {**r, "label": "x"}, "has label 'x'"),
    (lambda r: {k: v for k, v in r.items() if k != "frames"}, "has frames None"),
    (lambda r: {**r, "name": 5}, "a video without a name"),
    (lambda r: [r], "a video's record is a list, not a mapping"),
])
def test_absurd_metadata_of_one_video_skips_it_and_of_every_video_refuses(tmp_path, edit, message, caplog):
    """__meta__ is trusted for every video's size: a count of 0 or a missing field was a
    ValueError/TypeError traceback once training started, a label of 10**11 an OverflowError
    or a 10**11-way classifier, a width of 10**9 silently wrong boxes. One such record made
    the whole database unreadable: now that video keeps its id as an unreadable one (no
    frames, no size: every reader skips it), with a warning naming it; a database whose
    every record is absurd is still refused."""
    path, every = (write_lmdb(tmp_path / name, [coded_video(6, H, W) for _ in range(3)]) for name in ("a", "b"))
    rewrite_meta(path, lambda m: [m[0], edit(m[1]), m[2]])
    rewrite_meta(every, lambda m: [edit(r) for r in m])
    caplog.set_level(logging.WARNING, logger="pipelines.lmdb_store")
    metas, _ = fmt.read_metadata(str(path))
    assert [metas[0], metas[2]] == [fmt.VideoMeta(f"class{i % 2}/video{i:03d}", i % 2, 6, H, W, 25.0) for i in (0, 2)]
    name = "class1/video001" if "without a name" not in message and "list" not in message else "__meta__[1]"
    assert metas[1] == fmt.VideoMeta(name=name, label=0, frames=0, height=0, width=0, problem=metas[1].problem)
    assert metas[1].problem.startswith("its __meta__ record is malformed (__meta__[1]: ") and message in \
        metas[1].problem and metas[1].problem.endswith("); rebuild the database (python -m preprocessing build-lmdb)")
    assert metas[0].problem == metas[2].problem == ""
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"{path}: 1 of its 3 videos have a malformed __meta__ record; each keeps its id and is skipped like an "
        "unreadable video (rebuild the database to read them): __meta__[1]: ")
    assert message in warnings[0] and "\n" not in warnings[0]

    with pytest.raises(fmt.LmdbFormatError) as caught:
        fmt.read_metadata(str(every))
    assert str(caught.value).startswith(f"{every}: every one of its 3 __meta__ records is malformed (first: "
                                        "__meta__[0]: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_malformed_meta_header_is_still_refused(tmp_path):
    path = write_lmdb(tmp_path / "db.lmdb", [coded_video(6, H, W) for _ in range(2)])
    rewrite_meta(path, lambda m: 5)
    with pytest.raises(fmt.LmdbFormatError, match="__meta__ must be a list"):
        fmt.read_metadata(str(path))


def test_a_video_with_a_malformed_meta_record_is_replaced_and_keeps_the_ids(tmp_path, caplog):
    """Training over a database with one absurd __meta__ record runs every step; that video
    is never read, the others keep their ids (a skipped record would have shifted them)."""
    path = write_lmdb(tmp_path / "db.lmdb", [coded_video(24, H, W) for _ in range(8)])
    rewrite_meta(path, lambda m: [{**r, "frames": -1} if i == 5 else r for i, r in enumerate(m)])
    caplog.set_level(logging.WARNING)
    steps = run_epochs(str(path), epochs=2)
    assert len(steps) == 4   # 8 videos / batch 4 x 2 epochs
    videos = [v for ids, _, _ in steps for v in ids]
    assert 5 not in videos and set(videos) <= set(range(8)) - {5}
    assert sum(1 for _, subs, _ in steps for s in subs if s > 0) == 2   # video 5, once per epoch
    skipping = [r.getMessage() for r in caplog.records if "skipping video 5 (class1/video005)" in r.getMessage()]
    assert skipping == [f"skipping video 5 (class1/video005) of {path}: its __meta__ record is malformed "
                        "(__meta__[5]: video 'class1/video005' has frames -1, not an integer in [1, 1000000]); "
                        "rebuild the database (python -m preprocessing build-lmdb); another sample takes its place"]


def test_verify_decode_names_a_malformed_meta_record(tmp_path, capsys):
    """verify --decode reports a video kept for a malformed __meta__ record as such, and
    blocklists it with that reason; before, it decoded its frames against the placeholder's
    size ("frame is 64x48, metadata says 0x0")."""
    from preprocessing.__main__ import main

    path = write_lmdb(tmp_path / "db.lmdb", [coded_video(6, H, W) for _ in range(3)])
    rewrite_meta(path, lambda m: [m[0], {**m[1], "height": 0}, m[2]])
    blocklist = tmp_path / "blocked.txt"
    assert main(["verify", "--db", str(path), "--decode", "--blocklist", str(blocklist), "--workers", "1",
                 "--quiet"]) == 1
    reason = ("its __meta__ record is malformed (__meta__[1]: video 'class1/video001' has height 0, not an integer "
              "in [1, 65535]); rebuild the database (python -m preprocessing build-lmdb)")
    assert blocklist.read_text().splitlines() == [f"class1/video001\t{reason}"]
    out = capsys.readouterr().out
    assert f"problem class1/video001: {reason}\n" in out and "metadata says" not in out


def test_labels_past_the_class_names_size_the_classifier(tmp_path):
    """build-lmdb keeps list labels that do not follow the folders (label 5 with 2 folders):
    the clip loader's class count covers them (finetune.py crashed with 'Target 5 is out of
    bounds'; evaluate.py scored a 2-class head on them silently)."""
    from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
    from pipelines.clip_plan import ClipPlanConfig

    path = write_lmdb(tmp_path / "db.lmdb", [coded_video(6, H, W) for _ in range(2)], names=["a/x", "b/y"],
                      labels=[5, 1], classes=["a", "b"])
    loader = ClipLoader(str(path), "test", ClipPlanConfig(frames=2, crop_size=16, test_short_side=16),
                        ClipLoaderSettings(batch_size=1, num_threads=1), device="cpu")
    try:
        assert loader.num_classes == 6
    finally:
        loader.close()


def test_a_folder_of_videos_or_a_stray_file_as_the_lmdb_is_a_one_line_refusal(tmp_path, capsys):
    """data.path=the videos folder (an easy slip) or any non-LMDB file was an lmdb.Error traceback."""
    import train

    videos = tmp_path / "videos"
    (videos / "a").mkdir(parents=True)
    stray = tmp_path / "notes.txt"
    stray.write_text("not a database")
    for path, why in [(videos, "a folder without data.mdb"), (stray, "MDB_INVALID")]:
        with pytest.raises(fmt.LmdbFormatError, match=f"is not an LMDB \\(.*{why}"):
            fmt.read_metadata(str(path))
        assert train.main(["--out", str(tmp_path / "run"), f"data.path={path}", "device=cpu"]) == 2
        err = capsys.readouterr().err
        assert "is not an LMDB" in err and "Traceback" not in err
    assert sorted(p.name for p in videos.iterdir()) == ["a"]   # nothing written into the folder


def test_videos_without_a_label_are_refused_by_the_clip_loader(tmp_path):
    """A reference-layout LMDB read without its list labels a video outside a class folder -1:
    finetune.py died with 'Target -1 is out of bounds', evaluate.py with an index RuntimeError."""
    from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
    from pipelines.clip_plan import ClipPlanConfig

    path = write_lmdb(tmp_path / "ref.lmdb", [coded_video(6, H, W) for _ in range(3)], names=["v0", "v1", "v2"],
                      version=1)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key in (fmt.META_KEY, fmt.CLASSES_KEY, fmt.INFO_KEY):
            txn.delete(key)
    env.close()
    with pytest.raises(ValueError, match="3 of its 3 videos have no label .* list file"):
        ClipLoader(str(path), "test", ClipPlanConfig(frames=2, crop_size=16, test_short_side=16),
                   ClipLoaderSettings(batch_size=2, num_threads=1), device="cpu")
