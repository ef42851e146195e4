"""Layout version 2 of the LMDB (a frame table per video), the old layouts it replaces
(our version 1, the reference project's), and `convert` between them."""

from __future__ import annotations

import logging

import lmdb
import numpy as np
import pytest

from pipelines import lmdb_store as fmt
from pipelines.lmdb_store import LmdbFormatError, LmdbFrameReader, lmdb_keys, read_metadata
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from preprocessing import convert_lmdb as convert_module
from preprocessing.build_lmdb import BuildError
from preprocessing.convert_lmdb import ConvertError, ConvertInterrupted, convert_lmdb
from tests.lmdb_fixtures import assert_hints_exact, coded_video, encode_jpeg, write_lmdb
from tests.test_reference_lmdb import VIDEOS, build_reference_lmdb, frames_of

H, W = 24, 32
LENGTHS = (7, 12, 5, 9)


def videos():
    return [coded_video(n, H, W) for n in LENGTHS]


def all_entries(path) -> dict[bytes, bytes]:
    with fmt.shared_env(str(path)).begin() as txn:   # py-lmdb opens a database once per process
        return {bytes(k): bytes(v) for k, v in txn.cursor()}


def test_video_entries_are_a_header_and_a_key_per_frame():
    frames = [b"\xff\xd8" + bytes([i]) * (10 + i) + b"\xff\xd9" for i in range(3)]
    assert fmt.video_entries(12, frames) == [(b"000000012", b"CSF2\x03\x00\x00\x00"), (b"000000012/000000", frames[0]),
                                             (b"000000012/000001", frames[1]), (b"000000012/000002", frames[2])]
    assert fmt.header_frames(b"CSF2\x03\x00\x00\x00") == 3
    assert fmt.header_frames(fmt.pack(frames)) is None      # a version 1 entry
    with pytest.raises(LmdbFormatError, match="broken version 2 video header"):
        fmt.header_frames(b"CSF2\x03\x00\x00")
    # frame keys sort right after their video's key, before the next video's
    keys = sorted([k for k, _ in fmt.video_entries(3, frames) + fmt.video_entries(4, frames[:1])])
    assert keys == [b"000000003", b"000000003/000000", b"000000003/000001", b"000000003/000002",
                    b"000000004", b"000000004/000000"]


def test_version_2_frames_are_slices_of_the_map_not_copies(tmp_path):
    db = write_lmdb(tmp_path / "v2.lmdb", videos())
    reader = LmdbFrameReader(str(db))
    frames = reader.frames(1, [3, 0, 3, 11])
    assert all(isinstance(f, memoryview) for f in frames)
    maps = [line.split()[0].split("-") for line in open("/proc/self/maps") if str(db / "data.mdb") in line]
    assert maps
    for frame in frames:   # the frame's bytes are in the database's memory map
        address = np.frombuffer(frame, np.uint8).ctypes.data
        assert any(int(lo, 16) <= address < address + len(frame) <= int(hi, 16) for lo, hi in maps)
    assert np.frombuffer(frames[0], np.uint8).ctypes.data == np.frombuffer(frames[2], np.uint8).ctypes.data
    assert [bytes(f) for f in frames] == [encode_jpeg(videos()[1][i]) for i in (3, 0, 3, 11)]
    # the map is read-only: nothing handed to DALI can write into the database
    assert not np.frombuffer(frames[0], np.uint8).flags.writeable
    with pytest.raises(IndexError, match="frame 12 of a video with 12 frames"):
        reader.frames(1, [0, 12])


def test_read_hints_are_only_advice(tmp_path):
    db = write_lmdb(tmp_path / "v2.lmdb", videos())
    expected = [encode_jpeg(videos()[1][i]) for i in (0, 5, 11)]
    n = LENGTHS[1]
    env = lmdb.open(str(db), map_size=1 << 30)
    with env.begin(write=True) as txn:   # hints that point at the wrong bytes, or past the end of the file
        txn.put(fmt.video_key(1), fmt.hinted_header(n, [4096 * (i + 1) for i in range(n)], [1 << 20] * n))
    env.close()
    reader = LmdbFrameReader(str(db))
    assert [bytes(f) for f in reader.frames(1, [0, 5, 11])] == expected
    with pytest.raises(LmdbFormatError, match="broken version 2 video header"):
        fmt.header_frames(fmt.hinted_header(n, [0] * n, [0] * n)[:-1])


def test_both_layouts_give_the_same_bytes(tmp_path):
    v1 = LmdbFrameReader(str(write_lmdb(tmp_path / "v1.lmdb", videos(), version=1)))
    v2 = LmdbFrameReader(str(write_lmdb(tmp_path / "v2.lmdb", videos())))
    rng = np.random.default_rng(0)
    for video, n in enumerate(LENGTHS):
        wanted = rng.integers(0, n, size=10)
        assert [bytes(f) for f in v2.frames(video, wanted)] == v1.frames(video, wanted)
        assert [bytes(f) for f in v2.all_frames(video)] == [bytes(f) for f in v1.all_frames(video)]


def test_a_reader_survives_pickling_and_fork(tmp_path):
    import multiprocessing
    import pickle

    db = write_lmdb(tmp_path / "v2.lmdb", videos())
    reader = LmdbFrameReader(str(db))
    expected = bytes(reader.frames(2, [4])[0])   # opens the parent's transaction
    clone = pickle.loads(pickle.dumps(reader))
    assert bytes(clone.frames(2, [4])[0]) == expected
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_read_in_child, (reader,)) == expected


def _read_in_child(reader):
    return bytes(reader.frames(2, [4])[0])


def test_old_layout_logs_one_line_that_says_how_to_convert(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.lmdb_store")
    old = write_lmdb(tmp_path / "old.lmdb", videos(), version=1)
    new = write_lmdb(tmp_path / "new.lmdb", videos())
    for _ in range(2):
        assert read_metadata(str(old)) == read_metadata(str(new))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "whole-video layout" in lines[0] and f"python -m preprocessing convert --db {old}" in lines[0]


def test_loader_batches_are_the_same_on_both_layouts_with_worker_processes(tmp_path):
    cfg = PlanConfig(frames=4, crop_size=16)
    settings = LoaderSettings(batch_size=2, num_threads=1, workers=2, seed=3)

    def batches(path):
        loader = PretrainLoader(str(path), cfg, settings)
        return [{k: v.numpy().copy() for k, v in batch.items()} for batch in loader]

    old = batches(write_lmdb(tmp_path / "v1.lmdb", videos(), version=1))
    new = batches(write_lmdb(tmp_path / "v2.lmdb", videos()))
    assert len(old) == len(new) == 2
    for a, b in zip(old, new):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_convert_is_exact(tmp_path):
    old = write_lmdb(tmp_path / "old.lmdb", videos(), version=1)
    report = convert_lmdb(old, tmp_path / "new.lmdb", progress=False)
    assert report["converted"] == len(LENGTHS) and report["failed"] == [] and report["resumed"] == 0
    before, after = all_entries(old), all_entries(tmp_path / "new.lmdb")
    for key, value in before.items():
        if key == fmt.INFO_KEY:
            assert fmt.unpack(after[key]) == {**fmt.unpack(value), "version": 2, "converted_from": 1}
        elif key.isdigit():   # every frame, byte for byte, under its own key
            frames = fmt.unpack(value)
            assert after[key][:8] == b"CSF2" + len(frames).to_bytes(4, "little")
            assert [after[fmt.frame_key(int(key), i)] for i in range(len(frames))] == frames
            assert_hints_exact(tmp_path / "new.lmdb", after[key], frames)
        else:
            assert after[key] == value
    assert len(after) == len(before) + sum(LENGTHS)
    assert fmt.layout_version(str(tmp_path / "new.lmdb")) == 2


def test_convert_writes_exact_read_hints_for_frames_of_their_own_pages(tmp_path):
    big = [coded_video(6, 240, 320) for _ in range(3)]      # JPEGs of several KiB: overflow pages
    old = write_lmdb(tmp_path / "old.lmdb", big, version=1)
    convert_lmdb(old, tmp_path / "new.lmdb", progress=False)
    entries = all_entries(tmp_path / "new.lmdb")
    for video in range(3):
        frames = [entries[fmt.frame_key(video, i)] for i in range(6)]
        header = entries[fmt.video_key(video)]
        assert len(header) == 8 + 12 * 6 and min(len(f) for f in frames) >= 2048
        assert all(fmt.header_hints(header, 6)[0])     # every frame has a hint...
        assert_hints_exact(tmp_path / "new.lmdb", header, frames)   # ...naming exactly its bytes


def test_convert_resumes_after_an_interruption(tmp_path, monkeypatch):
    old = write_lmdb(tmp_path / "old.lmdb", videos(), version=1)
    convert_lmdb(old, tmp_path / "straight.lmdb", progress=False)
    calls = []
    real_entries = convert_module.video_entries

    def interrupt_third(entry, frames):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_entries(entry, frames)

    monkeypatch.setattr(convert_module, "video_entries", interrupt_third)
    with pytest.raises(ConvertInterrupted, match="2 of 4 videos are converted"):
        convert_lmdb(old, tmp_path / "resumed.lmdb", progress=False)
    assert (tmp_path / "resumed.lmdb.partial").is_dir() and not (tmp_path / "resumed.lmdb").exists()
    monkeypatch.setattr(convert_module, "video_entries", real_entries)
    report = convert_lmdb(old, tmp_path / "resumed.lmdb", progress=False)
    assert report["resumed"] == 2 and report["converted"] == 4
    assert not (tmp_path / "resumed.lmdb.partial").exists()
    assert all_entries(tmp_path / "resumed.lmdb") == all_entries(tmp_path / "straight.lmdb")


def test_convert_a_reference_lmdb_read_through_its_list(tmp_path):
    db = tmp_path / "ref.lmdb"
    order = build_reference_lmdb(db)
    convert_lmdb(db, tmp_path / "ref2.lmdb", progress=False)
    listing = tmp_path / "list.txt"
    listing.write_text("bowling/bb.avi 0 9\narchery/ab.avi 1 7\ncycling/ca.avi 2 4\n")
    metas, classes = read_metadata(str(tmp_path / "ref2.lmdb"), str(listing))
    assert (metas, classes) == read_metadata(str(db), str(listing))
    assert [m.key for m in metas] == [order.index(n) for n in ("bowling/bb", "archery/ab", "cycling/ca")]
    reader = LmdbFrameReader(str(tmp_path / "ref2.lmdb"), lmdb_keys(metas))
    for video, meta in enumerate(metas):
        assert [bytes(f) for f in reader.all_frames(video)] == frames_of(meta.name)
    # without a list: every video, its length from the header and its size from frame 0's JPEG header
    all_metas, _ = read_metadata(str(tmp_path / "ref2.lmdb"))
    assert sorted((m.name, m.frames) for m in all_metas) == sorted(VIDEOS.items())


def test_convert_skips_an_unreadable_entry_and_refuses_what_it_cannot_do(tmp_path):
    old = write_lmdb(tmp_path / "old.lmdb", videos(), version=1)
    env = lmdb.open(str(old), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(fmt.video_key(2), b"\xc1\xc1 not msgpack")
    env.close()
    report = convert_lmdb(old, tmp_path / "new.lmdb", progress=False)
    assert report["converted"] == 3
    assert [f["key"] for f in report["failed"]] == ["000000002"] and "neither" in report["failed"][0]["reason"]
    assert fmt.video_key(2) not in all_entries(tmp_path / "new.lmdb")
    with pytest.raises(ConvertError, match="already has layout version 2"):
        convert_lmdb(tmp_path / "new.lmdb", tmp_path / "again.lmdb", progress=False)
    with pytest.raises(BuildError, match="already exists"):
        convert_lmdb(old, tmp_path / "new.lmdb", progress=False)
    with pytest.raises(ConvertError, match="LMDB not found"):
        convert_lmdb(tmp_path / "nope.lmdb", tmp_path / "x.lmdb", progress=False)


def test_convert_refuses_what_is_not_an_lmdb_or_is_cut_short(tmp_path):
    """An empty folder, a stray file or a data.mdb cut short were LmdbFormatError / DataFaultError
    tracebacks (open_readonly raises those, not the lmdb.Error that convert caught)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "stray.bin").write_bytes(bytes(range(256)) * 64)
    whole = write_lmdb(tmp_path / "whole.lmdb", videos(), version=1)
    cut = tmp_path / "cut.lmdb"
    cut.mkdir()
    data = (whole / "data.mdb").read_bytes()
    (cut / "data.mdb").write_bytes(data[:len(data) // 2])
    for db, message in (("empty", "is not an LMDB (a folder without data.mdb)"),
                        ("stray.bin", "is not an LMDB"), ("cut.lmdb", "an incomplete copy")):
        with pytest.raises(ConvertError, match=message.replace("(", r"\(").replace(")", r"\)")):
            convert_lmdb(tmp_path / db, tmp_path / f"{db}.out", progress=False)
