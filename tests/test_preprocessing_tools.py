"""Tests of the dataset tools: probe, validate, lists and verify (preprocessing/tools_cli.py).

Every video is a tiny clip generated with ffmpeg in a temporary folder."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest

from pipelines.lmdb_store import frame_key, read_video_frames, video_entries
from preprocessing.build_lmdb import build_lmdb
from preprocessing.ffmpeg_tools import executable, missing_tools
from preprocessing.probe import pts_irregular, rates_differ, read_table, write_table
from preprocessing.validate import judge
from preprocessing.verify import sample_indices

PROJECT_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")

ODD_NAME = "odd name (1) !.mp4"


def ffmpeg_run(*args: str) -> None:
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def make_clip(path: Path, frames: int = 10, size: str = "64x48", pix_fmt: str = "yuv420p", codec: str = "libx264",
              extra: tuple = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = ["-c:v", codec] + (["-preset", "ultrafast"] if codec == "libx264" else [])
    ffmpeg_run("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25", "-frames:v", str(frames), *encoder,
               "-pix_fmt", pix_fmt, *extra, str(path))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------- probe + validate

@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """One file of each kind that probe and validate must tell apart."""
    root = tmp_path_factory.mktemp("zoo")
    make_clip(root / "good.mp4", frames=25)
    ffmpeg_run("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "0.5", "-c:a", "aac", str(root / "audio_only.mp4"))
    make_clip(root / "ten_bit.mp4", frames=5, pix_fmt="yuv420p10le")
    make_clip(root / "yuv444_odd.mp4", frames=5, size="65x49", pix_fmt="yuv444p")
    ffmpeg_run("-i", str(root / "good.mp4"), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(root / "rotated.mp4"))
    # Frames 12.. are spaced three times wider: a variable frame rate.
    make_clip(root / "vfr.mp4", frames=25, extra=("-vf", "setpts='if(lt(N,12),N,12+(N-12)*3)/25/TB'",
                                                  "-fps_mode", "passthrough"))
    make_clip(root / "three_frames.mp4", frames=3)
    # Video and audio packets together exceed probe's packet window (the window counts both).
    ffmpeg_run("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-f", "lavfi", "-i", "sine=r=48000",
               "-t", "5", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
               str(root / "with_audio.mp4"))
    (root / "random.mp4").write_bytes(random.Random(0).randbytes(4000))
    (root / "empty.mp4").write_bytes(b"")
    make_clip(root / ODD_NAME, frames=7)
    # Index first (+faststart), then the frame data cut off after a third: ffprobe opens it.
    full = make_clip(root / "scratch" / "full.mkv.tmp.mp4", frames=30, extra=("-movflags", "+faststart"))
    data = full.read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    shutil.rmtree(root / "scratch")
    return root


@pytest.fixture(scope="module")
def probe_table(zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "zoo.tsv"
    result = run_cli("probe", "--videos", str(zoo), "--out", str(out), "--count-frames", "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "probed 12 files (2 unreadable)" in result.stdout
    return out


def test_probe_reports_each_file(probe_table):
    rows = {row["file"]: row for row in read_table(probe_table)}
    assert set(rows) == {"good.mp4", "audio_only.mp4", "ten_bit.mp4", "yuv444_odd.mp4", "rotated.mp4", "vfr.mp4",
                         "three_frames.mp4", "random.mp4", "empty.mp4", ODD_NAME, "cut.mp4", "with_audio.mp4"}
    good = rows["good.mp4"]
    assert (good["readable"], good["codec"], good["pix_fmt"], good["bit_depth"], good["chroma"]) == \
        (1, "h264", "yuv420p", 8, "4:2:0")
    assert (good["width"], good["height"], good["rotation"], good["nb_frames"], good["counted_frames"]) == \
        (64, 48, 0, 25, 25)
    assert (good["avg_fps"], good["r_fps"], good["duration"], good["vfr"], good["audio_only"]) == \
        (25.0, 25.0, 1.0, 0, 0)
    assert good["decode_errors"] == "" and good["ends_early"] == 0
    assert rows["audio_only.mp4"]["audio_only"] == 1 and rows["audio_only.mp4"]["codec"] == ""
    assert (rows["ten_bit.mp4"]["bit_depth"], rows["ten_bit.mp4"]["pix_fmt"]) == (10, "yuv420p10le")
    odd = rows["yuv444_odd.mp4"]
    assert (odd["chroma"], odd["width"], odd["height"]) == ("4:4:4", 65, 49)
    assert rows["rotated.mp4"]["rotation"] == 90 and rows["rotated.mp4"]["width"] == 64  # stored size
    assert rows["vfr.mp4"]["vfr"] == 1 and rows["vfr.mp4"]["pts_irregular"] == 1
    assert rows["vfr.mp4"]["avg_fps"] < 20 and rows["vfr.mp4"]["r_fps"] == 25.0
    assert (rows["three_frames.mp4"]["nb_frames"], rows["three_frames.mp4"]["counted_frames"]) == (3, 3)
    with_audio = rows["with_audio.mp4"]
    assert (with_audio["has_audio"], with_audio["audio_only"], with_audio["ends_early"]) == (1, 0, 0)
    assert with_audio["counted_frames"] == with_audio["nb_frames"] == 125
    assert rows["random.mp4"]["readable"] == 0 and "ffprobe cannot read it" in rows["random.mp4"]["error"]
    assert rows["empty.mp4"]["readable"] == 0 and "empty" in rows["empty.mp4"]["error"]
    assert rows[ODD_NAME]["readable"] == 1 and rows[ODD_NAME]["counted_frames"] == 7
    cut = rows["cut.mp4"]
    assert cut["readable"] == 1 and cut["nb_frames"] == 30 and cut["counted_frames"] < 30 and cut["ends_early"] == 1
    for name in set(rows) - {"vfr.mp4"}:
        assert rows[name]["vfr"] in (0, ""), name


def test_probe_json_table_and_list(zoo, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"good.mp4 0\n{ODD_NAME}\t1\nrandom.mp4 0\n")
    out = tmp_path / "t.json"
    result = run_cli("probe", "--videos", str(zoo), "--list", str(list_file), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_table(out)
    assert [row["file"] for row in rows] == ["good.mp4", ODD_NAME, "random.mp4"]
    assert [row["readable"] for row in rows] == [1, 1, 0]
    assert rows[0]["counted_frames"] == "" and rows[0]["nb_frames"] == 25


def test_probe_skips_list_entries_outside_videos(zoo, tmp_path):
    """A --list entry that leaves --videos ('../x.mp4', an absolute path, 'a/../../x.mp4') is
    skipped with build-lmdb's reason and counted; before, the file beside --videos was probed."""
    outside = tmp_path / "outside.mp4"
    shutil.copy(zoo / "good.mp4", outside)
    videos = tmp_path / "videos"
    shutil.copytree(zoo, videos, ignore=lambda folder, names: [n for n in names if n != "good.mp4"])
    listed = ["good.mp4", "../outside.mp4", str(outside), "a/../../outside.mp4"]
    (tmp_path / "list.txt").write_text("".join(f"{path} 0\n" for path in listed))
    reason = "path leaves --videos (absolute or '..'); list paths are relative to --videos"
    for out in (tmp_path / "t.tsv", tmp_path / "t.json"):
        result = run_cli("probe", "--videos", str(videos), "--list", str(tmp_path / "list.txt"), "--out", str(out),
                         "--quiet")
        assert result.returncode == 0, result.stderr
        assert "probed 1 files (0 unreadable), skipped 3, " in result.stdout
        assert result.stderr.splitlines() == [f"skipped {path}: {reason}" for path in listed[1:]]
        assert [row["file"] for row in read_table(out)] == ["good.mp4"]


def test_a_json_probe_table_records_the_skipped_entries_and_validate_reads_its_rows(zoo, tmp_path):
    """The JSON table keeps the entries probe skipped (they were printed, then lost), as
    "skipped": [{"file", "reason"}]; validate still judges its rows only."""
    videos = tmp_path / "videos"
    shutil.copytree(zoo, videos, ignore=lambda folder, names: [n for n in names if n != "good.mp4"])
    (tmp_path / "list.txt").write_text("good.mp4 0\n../outside.mp4 0\n/abs/x.mp4 1\n")
    out = tmp_path / "t.json"
    result = run_cli("probe", "--videos", str(videos), "--list", str(tmp_path / "list.txt"), "--out", str(out),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    reason = "path leaves --videos (absolute or '..'); list paths are relative to --videos"
    table = json.loads(out.read_text())
    assert table["skipped"] == [{"file": "../outside.mp4", "reason": reason}, {"file": "/abs/x.mp4", "reason": reason}]
    assert [row["file"] for row in table["rows"]] == ["good.mp4"]
    result = run_cli("validate", "--probe", str(out), "--out", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert [entry["file"] for entry in json.loads((tmp_path / "report.json").read_text())["files"]] == ["good.mp4"]


EXPECTED_BUCKETS = {
    "good.mp4": "ok", "three_frames.mp4": "ok", ODD_NAME: "ok", "rotated.mp4": "ok", "vfr.mp4": "ok",
    "with_audio.mp4": "ok",
    "audio_only.mp4": "no_video", "random.mp4": "unreadable", "empty.mp4": "unreadable",
    "ten_bit.mp4": "nvdec_unsupported", "yuv444_odd.mp4": "nvdec_unsupported", "cut.mp4": "truncated",
}


def test_validate_buckets_and_blocklist(probe_table, tmp_path):
    out, blocklist = tmp_path / "report.json", tmp_path / "blocked.txt"
    result = run_cli("validate", "--probe", str(probe_table), "--out", str(out), "--blocklist", str(blocklist))
    assert result.returncode == 0, result.stderr
    assert "files 12: ok 6, blocked 6" in result.stdout
    report = json.loads(out.read_text())
    files = {entry["file"]: entry for entry in report["files"]}
    assert {name: entry["bucket"] for name, entry in files.items()} == EXPECTED_BUCKETS
    assert report["counts"]["nvdec_unsupported"] == 2 and report["counts"]["unreadable"] == 2
    reasons = {name: " ".join(entry["reasons"]) for name, entry in files.items()}
    assert "10-bit" in reasons["ten_bit.mp4"]
    assert "4:4:4" in reasons["yuv444_odd.mp4"] and "odd frame size 65x49" in reasons["yuv444_odd.mp4"]
    assert "decoded" in reasons["cut.mp4"] and "of the 30 frames" in reasons["cut.mp4"]
    assert "audio only" in reasons["audio_only.mp4"]
    assert any("rotation" in w for w in files["rotated.mp4"]["warnings"])
    assert any("variable frame rate" in w for w in files["vfr.mp4"]["warnings"])
    assert files["good.mp4"]["warnings"] == [] and files["good.mp4"]["reasons"] == []

    lines = blocklist.read_text().splitlines()
    blocked = dict(line.split("\t", 1) for line in lines)
    assert set(blocked) == {name for name, bucket in EXPECTED_BUCKETS.items() if bucket != "ok"}
    assert blocked["cut.mp4"].startswith("truncated: ")
    assert blocked["empty.mp4"] == "unreadable: empty file (0 bytes)"


def test_validate_default_blocklist_path_and_bad_table(probe_table, tmp_path):
    result = run_cli("validate", "--probe", str(probe_table), "--out", str(tmp_path / "v.json"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "v.blocklist.txt").is_file()
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    result = run_cli("validate", "--probe", str(bad), "--out", str(tmp_path / "w.json"))
    assert result.returncode == 2 and "not a probe table" in result.stderr


def _row(**fields) -> dict:
    row = dict(file="x.mp4", readable=1, error="", codec="h264", pix_fmt="yuv420p", bit_depth=8, chroma="4:2:0",
               width=320, height=240, rotation=0, avg_fps=25.0, r_fps=25.0, nb_frames=100, counted_frames="",
               decode_errors="", duration=4.0, vfr=0, pts_irregular=0, ends_early=0, has_audio=0, audio_only=0,
               size_bytes=1000)
    row.update(fields)
    return row


@pytest.mark.parametrize("fields, bucket, reason", [
    ({}, "ok", ""),
    ({"nb_frames": 0}, "zero_frames", "no frames"),
    ({"counted_frames": 0}, "zero_frames", "no frames"),
    ({"counted_frames": 80}, "truncated", "decoded 80 of the 100"),
    ({"counted_frames": 95}, "ok", ""),
    ({"counted_frames": 100, "decode_errors": "Invalid NAL"}, "truncated", "decode errors: Invalid NAL"),
    ({"width": 4097}, "nvdec_unsupported", "larger than 4096"),
    ({"width": 40}, "nvdec_unsupported", "smaller than 48"),
    ({"codec": "prores", "pix_fmt": "yuv422p10le", "chroma": "4:2:2", "bit_depth": 10}, "nvdec_unsupported",
     "codec prores has no NVDEC decoder; 10-bit"),
    ({"codec": "hevc", "pix_fmt": "yuv422p", "chroma": "4:2:2"}, "nvdec_unsupported", "chroma 4:2:2"),
    ({"codec": "vp9", "pix_fmt": "yuv420p"}, "ok", ""),
])
def test_judge_rules(fields, bucket, reason):
    got_bucket, reasons, _ = judge(_row(**fields))
    assert got_bucket == bucket
    assert reason in "; ".join(reasons)


def test_validate_skips_a_malformed_row_and_judges_the_others(tmp_path):
    """One bad row of a long table is reported with its line and what is wrong, and left out;
    before, it refused the whole table. A table whose every row is bad is still refused."""
    table = tmp_path / "t.tsv"
    write_table([_row(file=f"v{i}.mp4") for i in range(6)], table)
    lines = table.read_text().splitlines()
    lines[2] = lines[2].replace("\t320\t", "\tabc\t")       # v1.mp4: width
    lines[4] = lines[4].replace("\t100\t", "\tinf\t")       # v3.mp4: nb_frames
    lines[5] = "v4.mp4\t1"                                  # v4.mp4: cut short
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "v.json"

    result = run_cli("validate", "--probe", str(table), "--out", str(out))

    assert result.returncode == 0, result.stderr
    problems = ["line 3 (v1.mp4): width 'abc' is not a number", "line 5 (v3.mp4): nb_frames 'inf' is not a number",
                "line 6 (v4.mp4): 2 fields, the header has 22"]
    assert result.stderr.splitlines() == [f"validate: skipped {table}, {problem}" for problem in problems]
    assert "files 3: ok 3, blocked 0; 3 malformed table rows skipped" in result.stdout
    report = json.loads(out.read_text())
    assert [entry["file"] for entry in report["files"]] == ["v0.mp4", "v2.mp4", "v5.mp4"]
    assert report["skipped_rows"] == problems
    with pytest.raises(ValueError, match=r"t.tsv, line 3 \(v1.mp4\): width 'abc' is not a number"):
        read_table(table)   # without a list for the skipped rows: strict

    json_table = tmp_path / "t.json"
    json_table.write_text(json.dumps({"rows": [7, _row(file="ok.mp4"), dict(_row(), file="")]}))
    skipped = []
    assert [row["file"] for row in read_table(json_table, skipped)] == ["ok.mp4"]
    assert skipped == ["row 1: not a row of named fields (int)", "row 3: no file name"]

    table.write_text("\n".join(lines[:1] + ["v0.mp4\t1", "v1.mp4"]) + "\n")
    result = run_cli("validate", "--probe", str(table), "--out", str(tmp_path / "w.json"))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == \
        f"validate: error: no row of the probe table {table} is usable (2 malformed)"
    assert not (tmp_path / "w.json").exists()


@pytest.mark.parametrize("suffix", [".tsv", ".json"])
def test_validate_refuses_a_table_too_large_to_be_one_before_reading_it(tmp_path, monkeypatch, capsys, suffix):
    """A table is read whole: one over MAX_TABLE_BYTES (1 GiB) is refused from its size, exit 2,
    never opened; before, any file named by --probe was read into memory."""
    import preprocessing.probe as probe
    from preprocessing.__main__ import main

    table, out = tmp_path / f"t{suffix}", tmp_path / "v.json"
    write_table([_row(file="v0.mp4")], table)
    size = table.stat().st_size
    monkeypatch.setattr(probe, "MAX_TABLE_BYTES", size - 1)
    opened = []
    monkeypatch.setattr(probe, "open", lambda *a, **k: opened.append(a), raising=False)
    monkeypatch.setattr(probe.Path, "read_text", lambda self, *a, **k: opened.append(self))

    assert main(["validate", "--probe", str(table), "--out", str(out)]) == 2

    assert capsys.readouterr().err.splitlines() == [
        f"validate: error: cannot read the probe table {table}: {table} is {size} bytes, more than a probe table "
        f"can be ({size - 1}); pass the table that `python -m preprocessing probe` wrote"]
    assert opened == [] and not out.exists()


def test_frame_rate_helpers():
    assert not rates_differ(29.97, 30000 / 1001) and rates_differ(12.5, 25) and not rates_differ(0, 25)
    assert not pts_irregular([0, 1024, 512, 1536, 2048, 2560])      # B-frame order, even spacing
    assert pts_irregular([0, 512, 1024, 3072, 3584, 4096, 4608])
    assert not pts_irregular([0, 512, 1024, 1536, 1600])             # a short last packet is fine
    assert sample_indices(10, None) == list(range(10)) and sample_indices(10, 3) == [0, 4, 9]
    assert sample_indices(2, 5) == [0, 1] and sample_indices(7, 1) == [0]


# --------------------------------------------------------------------------- lists

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_lists_ucf101_with_frame_counts(tmp_path):
    ann, videos, out = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101", tmp_path / "out"
    _write(ann / "classInd.txt", "1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n3 YoYo\r\n")  # CRLF as in the release
    _write(ann / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
                                    "HandstandPushups/v_HandStandPushups_g01_c01.avi 2\nYoYo/v_YoYo_g01_c01.avi 3\n")
    _write(ann / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nYoYo/v_YoYo_g02_c01.avi\n")
    _write(ann / "trainlist02.txt", "YoYo/v_YoYo_g01_c01.avi 3\n")
    for name, frames in (("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 5),
                         ("HandstandPushups/v_HandStandPushups_g01_c01.avi", 7), ("YoYo/v_YoYo_g01_c01.avi", 4),
                         ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 6)):  # YoYo g02 is missing
        make_clip(videos / name, frames=frames, codec="mpeg4")

    result = run_cli("lists", "--dataset", "ucf101", "--annotations", str(ann), "--videos", str(videos),
                     "--out", str(out), "--split", "1", "--quiet")

    assert result.returncode == 0, result.stderr
    assert "missing YoYo/v_YoYo_g02_c01.avi: not found" in result.stderr
    assert _lines(out / "classes.txt") == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    assert _lines(out / "train.txt") == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 0",
                                         "HandstandPushups/v_HandStandPushups_g01_c01.avi 1",
                                         "YoYo/v_YoYo_g01_c01.avi 2"]
    assert _lines(out / "test.txt") == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 0"]
    assert _lines(out / "trainlist01_nframe.txt") == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 0 5",
                                                      "HandstandPushups/v_HandStandPushups_g01_c01.avi 1 7",
                                                      "YoYo/v_YoYo_g01_c01.avi 2 4"]
    assert _lines(out / "testlist01_nframe.txt") == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 0 6"]
    assert _lines(out / "missing.txt") == ["YoYo/v_YoYo_g02_c01.avi\tnot found under --videos"]


def test_lists_ucf101_refuses_a_label_that_contradicts_classind(tmp_path):
    ann = tmp_path / "ann"
    _write(ann / "classInd.txt", "1 A\n2 B\n")
    _write(ann / "trainlist01.txt", "A/v_A_g01_c01.avi 2\n")
    _write(ann / "testlist01.txt", "")
    (tmp_path / "videos").mkdir()
    result = run_cli("lists", "--dataset", "ucf101", "--annotations", str(ann), "--videos", str(tmp_path / "videos"),
                     "--out", str(tmp_path / "out"), "--no-frame-counts")
    assert result.returncode == 2
    assert "trainlist01.txt, line 1" in result.stderr and "folder is 'A'" in result.stderr


def test_lists_hmdb51_without_frame_counts(tmp_path):
    ann, videos, out = tmp_path / "splits", tmp_path / "hmdb51", tmp_path / "out"
    _write(ann / "brush_hair_test_split1.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
                                               "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \n"
                                               "April_09_brush_hair_u_nm_np1_ba_goo_2.avi 0 \n")
    _write(ann / "cartwheel_test_split1.txt", "Kick!_cartwheel_f_cm_np1_le_med_0.avi 1 \n"
                                              "(Cartwheel)_f_cm_np1_ri_med_1.avi 2 \n")
    _write(ann / "cartwheel_test_split2.txt", "Kick!_cartwheel_f_cm_np1_le_med_0.avi 2 \n")
    for name in ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                 "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi",
                 "cartwheel/Kick!_cartwheel_f_cm_np1_le_med_0.avi", "cartwheel/(Cartwheel)_f_cm_np1_ri_med_1.avi"):
        _write(videos / name, "")  # placeholders: no frame counts asked for

    result = run_cli("lists", "--dataset", "hmdb51", "--annotations", str(ann), "--videos", str(videos),
                     "--out", str(out), "--no-frame-counts")

    assert result.returncode == 0, result.stderr
    assert _lines(out / "classes.txt") == ["brush_hair", "cartwheel"]
    assert _lines(out / "train.txt") == ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi 0",
                                         "cartwheel/Kick!_cartwheel_f_cm_np1_le_med_0.avi 1"]
    assert _lines(out / "test.txt") == ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi 0",
                                        "cartwheel/(Cartwheel)_f_cm_np1_ri_med_1.avi 1"]
    assert _lines(out / "trainlist01.txt") == ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0 0",
                                               "cartwheel/Kick!_cartwheel_f_cm_np1_le_med_0 1"]
    assert _lines(out / "testlist01.txt") == ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1 0",
                                              "cartwheel/(Cartwheel)_f_cm_np1_ri_med_1 1"]
    assert _lines(out / "missing.txt") == []
    assert not (out / "trainlist01_nframe.txt").exists()


def test_lists_kinetics400_with_frame_counts(tmp_path):
    ann, videos, out = tmp_path / "k400.csv", tmp_path / "kinetics400", tmp_path / "out"
    _write(ann, "label,youtube_id,time_start,time_end,split\n"
                "abseiling,--07WQ2iBlw,1,11,val\n"
                "air drumming,abc123,5,15,val\n"
                "zumba,zz,0,10,train\n"
                "zumba,gone,30,40,train\n")
    make_clip(videos / "val" / "abseiling" / "--07WQ2iBlw_000001_000011.mp4", frames=5)  # '-' first: not an option
    make_clip(videos / "val" / "air_drumming" / "abc123_000005_000015.mp4", frames=6)  # label with '_' on disk
    make_clip(videos / "elsewhere" / "zz_000000_000010.mp4", frames=4)                 # found by its name

    result = run_cli("lists", "--dataset", "kinetics400", "--annotations", str(ann), "--videos", str(videos),
                     "--out", str(out), "--workers", "2", "--quiet")

    assert result.returncode == 0, result.stderr
    assert _lines(out / "classes.txt") == ["abseiling", "air drumming", "zumba"]
    assert _lines(out / "val.txt") == ["val/abseiling/--07WQ2iBlw_000001_000011.mp4 0",
                                       "val/air_drumming/abc123_000005_000015.mp4 1"]
    assert _lines(out / "val_list_label_nframe.txt") == ["val/abseiling/--07WQ2iBlw_000001_000011.mp4  0  5",
                                                         "val/air_drumming/abc123_000005_000015.mp4  1  6"]
    assert _lines(out / "train.txt") == ["elsewhere/zz_000000_000010.mp4 2"]
    assert _lines(out / "train_list_label_nframe.txt") == ["elsewhere/zz_000000_000010.mp4  2  4"]
    assert _lines(out / "missing.txt") == ["train/zumba/gone_000030_000040.mp4\tnot found under --videos"]


def test_lists_skips_annotated_paths_outside_videos(tmp_path):
    """An annotated path that leaves --videos is never looked for nor counted: it is listed as
    missing with build-lmdb's reason. Kinetics drops a path's first folder when looking: a label
    that is an absolute path made 'train//abs/x.mp4' find /abs/x.mp4 outside --videos."""
    ann, videos, out = tmp_path / "ann", tmp_path / "UCF-101", tmp_path / "out"
    outside = make_clip(tmp_path / "YoYo" / "v_YoYo_g09_c01.avi", frames=3, codec="mpeg4")
    make_clip(videos / "YoYo" / "v_YoYo_g01_c01.avi", frames=4, codec="mpeg4")
    _write(ann / "classInd.txt", "1 YoYo\n")
    _write(ann / "trainlist01.txt", f"YoYo/v_YoYo_g01_c01.avi 1\n../YoYo/v_YoYo_g09_c01.avi 1\n{outside} 1\n"
                                    "YoYo/../../YoYo/v_YoYo_g09_c01.avi 1\n")
    _write(ann / "testlist01.txt", "")
    result = run_cli("lists", "--dataset", "ucf101", "--annotations", str(ann), "--videos", str(videos),
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    reason = "path leaves --videos (absolute or '..'); list paths are relative to --videos"
    refs = ["../YoYo/v_YoYo_g09_c01.avi", str(outside), "YoYo/../../YoYo/v_YoYo_g09_c01.avi"]
    assert result.stderr.splitlines() == [f"missing {ref}: {reason}" for ref in refs]
    assert "missing 3 ->" in result.stdout
    assert _lines(out / "train.txt") == ["YoYo/v_YoYo_g01_c01.avi 0"]
    assert _lines(out / "missing.txt") == [f"{ref}\t{reason}" for ref in refs]

    k400, k_out = tmp_path / "k400.csv", tmp_path / "k_out"
    _write(k400, f"label,youtube_id,time_start,time_end,split\n{tmp_path / 'elsewhere'},zz,0,10,train\n")
    make_clip(tmp_path / "elsewhere" / "zz_000000_000010.mp4", frames=3)
    result = run_cli("lists", "--dataset", "kinetics400", "--annotations", str(k400), "--videos", str(videos),
                     "--out", str(k_out), "--no-frame-counts")
    assert result.returncode == 1
    assert _lines(k_out / "train.txt") == []
    assert _lines(k_out / "missing.txt") == [f"train/{tmp_path}/elsewhere/zz_000000_000010.mp4\t"
                                             "not found under --videos"]


def test_lists_output_is_a_usable_build_list(tmp_path):
    """Our format (TAB when a path has spaces) parses back with build-lmdb's reader."""
    from preprocessing.build_lmdb import read_list_file

    ann, videos, out = tmp_path / "k.csv", tmp_path / "v", tmp_path / "out"
    _write(ann, "label,youtube_id,time_start,time_end,split\nair drumming,a b,0,10,train\n")
    _write(videos / "train" / "air drumming" / "a b_000000_000010.mp4", "")
    result = run_cli("lists", "--dataset", "kinetics400", "--annotations", str(ann), "--videos", str(videos),
                     "--out", str(out), "--no-frame-counts")
    assert result.returncode == 0, result.stderr
    assert [(p, label) for _, p, label in read_list_file(out / "train.txt")] == \
        [("train/air drumming/a b_000000_000010.mp4", 0)]


K400_HEADER = "label,youtube_id,time_start,time_end,split\n"


@pytest.mark.parametrize("text, message", [
    (K400_HEADER + '"abc,x,1,2,train\n', "line 2: expected 5 fields"),       # unclosed quote: AttributeError
    (K400_HEADER + "abc,x,1,2\n", "line 2: expected 5 fields"),               # no split: AttributeError
    (K400_HEADER + '"a\nb",x,1,2,train\n', "a line break or TAB inside a field"),   # broke classes.txt
    (K400_HEADER + "a," + "x" * 200_000 + ",1,2,train\n", "not a CSV file (field larger than"),   # csv.Error
])
def test_a_malformed_kinetics_csv_says_which_line(tmp_path, text, message):
    from preprocessing.lists import ListsError, load_annotations

    with pytest.raises(ListsError, match=message.replace("(", r"\(")):
        load_annotations("kinetics400", _write(tmp_path / "k.csv", text))


def test_a_binary_or_huge_kinetics_csv_is_refused(tmp_path, monkeypatch):
    """Bytes that are not UTF-8 were a UnicodeDecodeError traceback; the CSV was read without
    MAX_ANNOTATION_BYTES, which bounds the other annotation files."""
    from preprocessing import lists

    binary = tmp_path / "bin.csv"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(lists.ListsError, match="expected the header label,youtube_id"):
        lists.load_annotations("kinetics400", binary)
    monkeypatch.setattr(lists, "MAX_ANNOTATION_BYTES", 100)
    with pytest.raises(lists.ListsError, match="larger than 0 MiB; not an annotation file"):
        lists.load_annotations("kinetics400", _write(tmp_path / "k.csv", K400_HEADER + "abc,x,1,2,train\n" * 10))


# --------------------------------------------------------------------------- verify

@pytest.fixture(scope="module")
def good_db(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    videos = root / "videos"
    make_clip(videos / "a" / "clip0.mp4", frames=6)
    make_clip(videos / "a" / "clip1.mp4", frames=4)
    make_clip(videos / "b" / "clip2.mp4", frames=5)
    db = root / "good.lmdb"
    report = build_lmdb(videos, db, workers=1, progress=False)
    assert report["counts"]["ok"] == 3
    return db, videos


def _corrupt_copy(db: Path, dest: Path, change) -> Path:
    shutil.copytree(db, dest)
    env = lmdb.open(str(dest), map_size=1 << 28, subdir=True)
    with env.begin(write=True) as txn:
        change(txn)
    env.sync(True)
    env.close()
    return dest


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False)


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def test_verify_passes_a_good_database(good_db):
    db, videos = good_db
    result = run_cli("verify", "--db", str(db), "--videos", str(videos))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify OK: 3 videos, 15 frames (15 checked)" in result.stdout
    assert "source videos" in result.stdout
    result = run_cli("verify", "--db", str(db), "--sample", "2")
    assert result.returncode == 0 and "(6 checked)" in result.stdout


def _frames(txn, video: int) -> list[bytes]:
    return [bytes(f) for f in read_video_frames(txn, video)]


def _put_video(txn, video: int, frames) -> None:
    """Replace a video by these frames (layout 2: the header and one key per frame)."""
    for i in range(len(_frames(txn, video))):
        txn.delete(frame_key(video, i))
    for key, value in video_entries(video, frames):
        txn.put(key, value)


def test_verify_finds_a_truncated_frame(good_db, tmp_path):
    def cut_frame(txn):
        frame = txn.get(frame_key(0, 3))
        txn.put(frame_key(0, 3), frame[: len(frame) // 2])
    bad = _corrupt_copy(good_db[0], tmp_path / "bad.lmdb", cut_frame)
    result = run_cli("verify", "--db", str(bad), "--report", str(tmp_path / "r.json"))
    assert result.returncode == 1
    assert "problem a/clip0: frame 3: frame is truncated" in result.stdout
    assert "1 PROBLEMS" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["problems"][0]["video"] == "a/clip0"
    # Sampling 2 frames of each video (first, last) does not look at frame 3.
    assert run_cli("verify", "--db", str(bad), "--sample", "2").returncode == 0


def test_verify_finds_a_missing_key_and_an_orphan(good_db, tmp_path):
    def drop(txn):
        txn.put(b"000000009", txn.get(b"000000001"))
        txn.delete(b"000000001")
    bad = _corrupt_copy(good_db[0], tmp_path / "bad.lmdb", drop)
    result = run_cli("verify", "--db", str(bad))
    assert result.returncode == 1
    assert "problem a/clip1: entry 000000001 is missing" in result.stdout
    assert "problem (key 000000009): video entry not listed in __keys__" in result.stdout


def test_verify_reports_a_meta_entry_that_is_not_a_list(good_db, tmp_path):
    bad = _corrupt_copy(good_db[0], tmp_path / "bad.lmdb", lambda txn: txn.put(b"__meta__", msgpack.packb(5)))
    result = run_cli("verify", "--db", str(bad))
    assert result.returncode == 1, result.stderr   # a TypeError traceback before
    assert "problem (index): __meta__ is a int, not a list of video records" in result.stdout


@pytest.mark.parametrize("height, shown", [("x", "'x'"), (float("inf"), "inf")])
def test_verify_reports_a_malformed_meta_record_and_checks_its_frames(good_db, tmp_path, height, shown):
    """A __meta__ record with a height of 'x' stopped verify ('invalid literal for int()', exit 2),
    one of inf with an OverflowError traceback; now it is one problem naming the record, and its
    frames are still checked, against the first frame's size. With --decode it is said once."""
    def edit(txn):
        metas = _unpack(txn.get(b"__meta__"))
        metas[1]["height"] = height
        txn.put(b"__meta__", _pack(metas))
    bad = _corrupt_copy(good_db[0], tmp_path / "bad.lmdb", edit)
    expected = [f"problem a/clip1: its __meta__ record is malformed (__meta__[1]: video 'a/clip1' has height {shown}, "
                "not an integer in [1, 65535]); rebuild the database (python -m preprocessing build-lmdb)"]
    for decode in ([], ["--decode", "--workers", "1"]):
        result = run_cli("verify", "--db", str(bad), "--quiet", *decode)
        assert result.returncode == 1, result.stderr
        assert [line for line in result.stdout.splitlines() if line.startswith("problem")] == expected
        assert "1 PROBLEMS: 3 videos, 15 frames (15 checked)" in result.stdout


def test_verify_finds_count_mismatches(good_db, tmp_path):
    def miscount(txn):
        vlen = _unpack(txn.get(b"__vlen__"))
        vlen[2] += 1
        txn.put(b"__vlen__", _pack(vlen))
        _put_video(txn, 1, _frames(txn, 1)[:-1])  # drop a frame: __meta__ and __vlen__ both disagree
        txn.put(b"__len__", _pack(4))
        metas = _unpack(txn.get(b"__meta__"))
        metas[0]["label"] = 7
        txn.put(b"__meta__", _pack(metas))
    bad = _corrupt_copy(good_db[0], tmp_path / "bad.lmdb", miscount)
    result = run_cli("verify", "--db", str(bad))
    assert result.returncode == 1
    assert "problem b/clip2: 5 frames stored, __vlen__ says 6" in result.stdout
    assert "problem a/clip1: 3 frames stored, __vlen__ says 4" in result.stdout
    assert "problem a/clip1: 3 frames stored, __meta__ says 4" in result.stdout
    assert "problem (index): index lengths disagree" in result.stdout and "__len__=4" in result.stdout
    assert "problem a/clip0: label 7 is not an index into the 2 classes" in result.stdout


def test_verify_checks_every_frame_key_and_the_layout(good_db, tmp_path):
    def damage(txn):
        txn.delete(frame_key(0, 4))
        txn.put(b"000000001", b"CSF2" + (4).to_bytes(4, "little") + b"!")     # a header of 9 bytes
        frames = _frames(txn, 2)
        txn.put(b"000000002", _pack(frames))  # a version 1 entry in a version 2 database
    bad = _corrupt_copy(good_db[0], tmp_path / "bad.lmdb", damage)
    result = run_cli("verify", "--db", str(bad))
    assert result.returncode == 1
    assert "problem a/clip0: 1 of the 6 frames are missing (e.g. frame 4)" in result.stdout
    assert "problem a/clip1: broken version 2 video header (9 bytes, 4 frames)" in result.stdout
    assert "problem b/clip2: entry is in layout 1, __info__ says version 2" in result.stdout
    assert "3 PROBLEMS" in result.stdout


def test_verify_reads_the_whole_video_layout(good_db, tmp_path):
    from preprocessing.verify import verify_db

    def to_v1(txn):
        for video in range(3):
            frames = _frames(txn, video)
            for i in range(len(frames)):
                txn.delete(frame_key(video, i))
            txn.put(b"%09d" % video, _pack(frames))
        info = _unpack(txn.get(b"__info__"))
        txn.put(b"__info__", _pack({**info, "version": 1}))
    old = _corrupt_copy(good_db[0], tmp_path / "v1.lmdb", to_v1)
    report = verify_db(old)
    assert report["problems"] == [] and report["layout"] == 1 and report["frames_checked"] == 15


def test_verify_api_in_a_process_that_already_reads_the_database(good_db):
    from pipelines.lmdb_store import read_metadata
    from preprocessing.verify import verify_db

    metas, _ = read_metadata(str(good_db[0]))  # holds the process's environment for this database
    report = verify_db(good_db[0], videos_dir=good_db[1], sample=3)
    assert report["problems"] == [] and report["videos"] == len(metas) == 3
    assert report["frames_checked"] == 9 and report["sizes"]["source_bytes"] > 0


def test_verify_refuses_a_missing_database(tmp_path):
    result = run_cli("verify", "--db", str(tmp_path / "nope.lmdb"))
    assert result.returncode == 2 and "LMDB not found" in result.stderr


# --------------------------------------------------------------------------- help

@pytest.mark.parametrize("command", ["probe", "validate", "lists", "verify"])
def test_tool_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and f"python -m preprocessing {command}" in result.stdout


def test_top_level_help_lists_the_tools():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("probe", "validate", "lists", "verify", "build-lmdb"):
        assert command in result.stdout
