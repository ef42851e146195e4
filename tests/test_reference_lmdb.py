"""LMDBs in the reference project's layout (make_lmdb_kin.py), read through its list files."""

from __future__ import annotations

import random

import lmdb
import msgpack
import numpy as np
import pytest

from pipelines import lmdb_store as fmt
from pipelines.lmdb_store import LmdbFrameReader, lmdb_keys, read_metadata
from pipelines.reference_lmdb import (ReferenceListError, canonical_name, parse_list_line,
                                      read_reference_list)
from tests.lmdb_fixtures import coded_frame, encode_jpeg

# class/video -> number of frames; sizes differ per video so that a mix-up shows.
VIDEOS = {"archery/aa": 5, "archery/ab": 7, "bowling/ba": 6, "bowling/bb": 9, "cycling/ca": 4}
SIZES = {"archery/aa": (24, 32), "archery/ab": (32, 24), "bowling/ba": (24, 40), "bowling/bb": (16, 32),
         "cycling/ca": (40, 24)}


def frames_of(name: str) -> list[bytes]:
    h, w = SIZES[name]
    offset = sorted(VIDEOS).index(name) * 40    # frame "index" range per video: identity in the R channel
    return [encode_jpeg(coded_frame(offset + i, h, w)) for i in range(VIDEOS[name])]


def build_reference_lmdb(path) -> list[str]:
    """The reference's make_lmdb_kin.py, step for step: sorted class/video names,
    shuffled with seed 0, id = position in the shuffled list, per-class commits,
    `__keys__`/`__vlen__` in class order, no metadata of ours."""
    video_list = sorted(VIDEOS)
    random.seed(0)
    random.shuffle(video_list)
    env = lmdb.open(str(path), map_size=1 << 26)
    keys, vlen = [], []
    for cls in sorted({n.split("/")[0] for n in VIDEOS}):
        with env.begin(write=True) as txn:
            for name in sorted(n for n in VIDEOS if n.startswith(cls + "/")):
                key = ("%09d" % video_list.index(name)).encode("ascii")
                txn.put(key, msgpack.dumps(frames_of(name)))
                keys.append(key)
                vlen.append(VIDEOS[name])
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", msgpack.dumps(keys))
        txn.put(b"__len__", msgpack.dumps(len(keys)))
        txn.put(b"__order__", msgpack.dumps(video_list))
        txn.put(b"__vlen__", msgpack.dumps(vlen))
    env.close()
    return video_list


def test_names_and_list_lines():
    assert canonical_name("val/bowling/ba.mp4") == "bowling/ba"
    assert canonical_name("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi") == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01"
    assert canonical_name("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0") == \
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0"
    assert canonical_name("val/x.mp4") == "val/x"        # a class called "val" is not a split prefix
    assert parse_list_line("ApplyEyeMakeup/v_a.avi 0 121\n") == ("ApplyEyeMakeup/v_a.avi", 0, 121)
    assert parse_list_line("val/abseiling/0347ZoDXyP0.mp4  0  300\n") == ("val/abseiling/0347ZoDXyP0.mp4", 0, 300)
    assert parse_list_line("a b/c d.mp4 3\n") == ("a b/c d.mp4", 3, None)
    with pytest.raises(ReferenceListError, match="expected"):
        parse_list_line("no-label-here\n")


@pytest.mark.parametrize("line, message", [
    ("a/b.avi -1 10\n", "label -1 is not in"),
    ("a/b.avi 99999999999 10\n", "label 99999999999 is not in"),   # a [''] * 10**11 class list before
    ("a/b.avi 3 0\n", "frame count 0 is not in"),                   # a 0-frame video, a traceback in the plan
])
def test_reference_list_labels_and_frame_counts_are_bounded(tmp_path, line, message):
    listing = tmp_path / "list.txt"
    listing.write_text("a/ok.avi 0 10\n" + line)
    with pytest.raises(ReferenceListError, match=f"line 2: {message}"):
        read_reference_list(listing)


def test_reference_lmdb_read_through_ucf_style_list(tmp_path):
    db = tmp_path / "ref.lmdb"
    order = build_reference_lmdb(db)
    listing = tmp_path / "trainlist01_nframe.txt"
    # Single spaces, extensions, labels that are NOT sorted-class order, one video absent from the DB.
    listing.write_text("bowling/bb.avi 0 9\narchery/ab.avi 1 7\nmissing/zz.avi 2 10\ncycling/ca.avi 2 4\n")
    metas, classes = read_metadata(str(db), str(listing))
    assert [m.name for m in metas] == ["bowling/bb", "archery/ab", "cycling/ca"]
    assert [m.label for m in metas] == [0, 1, 2]
    assert classes == ["bowling", "archery", "cycling"]
    assert [m.key for m in metas] == [order.index(n) for n in ("bowling/bb", "archery/ab", "cycling/ca")]
    assert [(m.frames, m.height, m.width) for m in metas] == [(9, 16, 32), (7, 32, 24), (4, 40, 24)]
    reader = LmdbFrameReader(str(db), lmdb_keys(metas))
    for video, meta in enumerate(metas):
        assert reader.frames(video, [0, meta.frames - 1]) == [frames_of(meta.name)[0], frames_of(meta.name)[-1]]


def test_reference_lmdb_read_through_kinetics_style_list(tmp_path):
    db = tmp_path / "ref.lmdb"
    build_reference_lmdb(db)
    listing = tmp_path / "val_list_label_nframe.txt"
    # Two spaces, the "val/" prefix that __order__ lacks, a list frame count one short of the entry's.
    listing.write_text("val/archery/aa.mp4  0  5\nval/bowling/ba.mp4  1  5\n")
    metas, classes = read_metadata(str(db), str(listing))
    assert [(m.name, m.label, m.frames) for m in metas] == [("archery/aa", 0, 5), ("bowling/ba", 1, 5)]
    assert classes == ["archery", "bowling"]


def test_reference_lmdb_without_list_reads_headers_only(tmp_path):
    db = tmp_path / "ref.lmdb"
    order = build_reference_lmdb(db)
    metas, classes = read_metadata(str(db))
    assert classes == ["archery", "bowling", "cycling"]
    assert [m.name for m in metas] == order                     # entry id order
    assert [(m.frames, m.height, m.width) for m in metas] == [(VIDEOS[n], *SIZES[n]) for n in order]
    assert [m.label for m in metas] == [classes.index(n.split("/")[0]) for n in order]
    assert lmdb_keys(metas) is None                              # positions are the entry ids


def test_list_matching_nothing_is_refused_with_names(tmp_path):
    db = tmp_path / "ref.lmdb"
    build_reference_lmdb(db)
    listing = tmp_path / "other.txt"
    listing.write_text("val/golf/x.mp4  0  300\n")
    with pytest.raises(ReferenceListError, match="none of the 1 videos.*golf/x"):
        read_metadata(str(db), str(listing))
    listing.write_text("\n\n")
    with pytest.raises(ReferenceListError, match="lists no videos"):
        read_reference_list(listing)


def test_broken_entry_is_left_out_not_fatal(tmp_path):
    db = tmp_path / "ref.lmdb"
    order = build_reference_lmdb(db)
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(fmt.video_key(order.index("archery/aa")), b"\x93not msgpack of jpegs")
    env.close()
    listing = tmp_path / "list.txt"
    listing.write_text("archery/aa 0 5\nbowling/ba 1 6\n")
    metas, _ = read_metadata(str(db), str(listing))
    assert [m.name for m in metas] == ["bowling/ba"]
    assert np.array_equal([m.key for m in metas], [order.index("bowling/ba")])


@pytest.mark.parametrize("executor", ["dali", "reference"])
def test_pretraining_loaders_read_a_reference_lmdb_through_its_list(tmp_path, executor):
    """Both executors, fed a reference-layout LMDB and a list in another order than the
    entry ids, decode each listed video's own frames: the R channel carries a per-video
    frame number, and an entry of another video would also fail the size check and be
    substituted."""
    from pipelines.loader import LoaderSettings, PretrainLoader
    from pipelines.plan import PlanConfig
    from pipelines.reference_executor import ReferencePretrainLoader

    db = tmp_path / "ref.lmdb"
    build_reference_lmdb(db)
    listing = tmp_path / "list.txt"
    order = ["bowling/bb", "archery/ab", "cycling/ca", "bowling/ba"]
    listing.write_text("".join(f"{name}.avi {label} {VIDEOS[name]}\n" for label, name in enumerate(order)))
    cfg = PlanConfig(frames=4, crop_size=16, strong_prob=0.0, flip_prob=0.0)
    settings = LoaderSettings(batch_size=4, num_threads=1, seed=3, shuffle=False)
    make = PretrainLoader if executor == "dali" else ReferencePretrainLoader
    loader = make(str(db), cfg, settings, list_path=str(listing))
    assert [m.name for m in loader.metas] == order
    batch = next(iter(loader))
    if "substituted" in batch:   # the reference executor has no substitution
        assert batch["substituted"].tolist() == [0, 0, 0, 0]
    for sample, video in enumerate(batch["video_index"].tolist()):
        name = order[video]
        offset = sorted(VIDEOS).index(name) * 40
        own = {(offset + i) % 32 for i in range(VIDEOS[name])}
        for view in ("view1", "view2"):
            red = (batch[view][sample, 0].float().mean(dim=(1, 2)).numpy() + 1) * 127.5
            decoded = set(np.rint((red - 4) / 8).astype(int).tolist())
            assert decoded <= own, (name, view, decoded, own)
    if hasattr(loader, "close"):
        loader.close()


def test_an_unreadable_entry_read_without_a_list_is_skipped_saying_why(tmp_path, caplog):
    """Read without a list, an unreadable entry keeps its id as a placeholder whose problem
    names the entry and what is wrong with it; the skip message said only 'video 1 has no
    frames or no size (0 frames, 0x0)'."""
    import logging

    from pipelines.loader import LoaderSettings, PretrainLoader
    from pipelines.plan import PlanConfig

    db = tmp_path / "ref.lmdb"
    order = build_reference_lmdb(db)
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(fmt.video_key(1), b"\xc1 not msgpack")
        txn.delete(fmt.video_key(3))
    env.close()
    metas, _ = read_metadata(str(db))
    rebuild = "; rebuild the database (python -m preprocessing build-lmdb)"
    assert metas[1].problem == ("its LMDB entry 000000001 could not be decoded as a msgpack list of JPEG frames "
                                "(ValueError: Unexpected type header on stream)" + rebuild)
    assert metas[3].problem == "its LMDB entry 000000003 is missing" + rebuild
    assert [(m.frames, m.height, m.width) for m in (metas[1], metas[3])] == [(0, 0, 0)] * 2
    assert all(m.problem == "" for i, m in enumerate(metas) if i not in (1, 3))

    caplog.set_level(logging.WARNING, logger="pipelines.sources")
    loader = PretrainLoader(str(db), PlanConfig(frames=4, crop_size=16),
                            LoaderSettings(batch_size=5, num_threads=1, shuffle=False))
    batch = next(iter(loader))
    assert not {1, 3} & set(batch["video_index"].tolist())
    skipping = sorted(r.getMessage() for r in caplog.records if "skipping video" in r.getMessage())
    assert skipping == [f"skipping video {v} ({order[v]}) of {db}: {metas[v].problem}; another sample takes its "
                        "place" for v in (1, 3)]


def test_verify_decode_says_an_unreadable_entry_once_in_the_readers_words(tmp_path, capsys):
    """verify names an unreadable entry of a reference LMDB with the placeholder's problem,
    so that --decode (which reports the placeholder) says it once and blocklists it."""
    from preprocessing.__main__ import main

    db = tmp_path / "ref.lmdb"
    order = build_reference_lmdb(db)
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(fmt.video_key(1), b"\xc1 not msgpack")
    env.close()
    reason = read_metadata(str(db))[0][1].problem
    blocklist = tmp_path / "blocked.txt"
    for decode in ([], ["--decode", "--blocklist", str(blocklist)]):
        assert main(["verify", "--db", str(db), "--workers", "1", "--quiet", *decode]) == 1
        out = capsys.readouterr().out
        assert [line for line in out.splitlines() if line.startswith("problem")] == [f"problem {order[1]}: {reason}"]
    assert blocklist.read_text().splitlines() == [f"{order[1]}\t{reason}"]
