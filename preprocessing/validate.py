"""`validate`: judge a probe table (preprocessing/probe.py) and write a report and a blocklist.

Every file lands in exactly one bucket, the first that applies:

    unreadable         ffprobe cannot open it (missing, empty, garbage, no index)      blocked
    no_video           no video stream (audio-only files included)                    blocked
    zero_frames        the header or the decoder says 0 frames                        blocked
    truncated          decoded frames (--count-frames) below 90 % of the header's
                       count, decode errors while counting, or fewer packets in the
                       file than its header lists (checked over the first packets)    blocked
    nvdec_unsupported  the GPU video decoder (NVDEC through DALI's `mixed` decoder)
                       refuses it, see NVDEC_RULES; an LMDB (build-lmdb) or a
                       transcode to 8-bit 4:2:0 still works                           blocked
    ok                 usable (possibly with warnings)

Warnings (never blocked): variable frame rate (avg_frame_rate and r_frame_rate
differ by over 1 %, or irregular packet timestamps; DALI's legacy video reader
refuses VFR and sampling by frame index assumes a constant rate) and rotation
metadata (decoders do not apply it on the video path; ffmpeg does when building
an LMDB).

The blocklist has one line per blocked file: `<file>\t<bucket>: <reasons>`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .ffmpeg_io import TRUNCATED_FRACTION

# Codecs that NVDEC decodes (and DALI's fn.decoders.video accepts on the GPU).
NVDEC_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg1video", "mpeg2video", "mjpeg"})
NVDEC_MAX_SIDE = 4096     # H.264's NVDEC limit (HEVC/AV1 allow 8192 on recent GPUs; we keep one rule)
NVDEC_MIN_SIDE = 48       # NVDEC's minimum coded width is 48 (height 16); we require 48 on both sides
NVDEC_RULES = (f"codec in {{{', '.join(sorted(NVDEC_CODECS))}}}; 8-bit samples; 4:2:0 chroma for H.264 and "
               f"HEVC (NVDEC has no 4:2:2, and 4:4:4 only for HEVC on some GPUs); width and height "
               f"{NVDEC_MIN_SIDE}..{NVDEC_MAX_SIDE} and even (4:2:0 surfaces are even-sized)")

BUCKETS = ("ok", "unreadable", "no_video", "zero_frames", "truncated", "nvdec_unsupported")
BLOCKED = BUCKETS[1:]


def judge(row: dict) -> tuple[str, list[str], list[str]]:
    """(bucket, reasons, warnings) for one probe row (as read_table returns it)."""
    if not row.get("readable"):
        return "unreadable", [row.get("error") or "unreadable"], []
    if row.get("audio_only") or not row.get("codec"):
        return "no_video", [row.get("error") or "no video stream"], []

    warnings = []
    if row.get("vfr"):
        detail = "irregular timestamps" if row.get("pts_irregular") else \
            f"avg_frame_rate {row.get('avg_fps')} != r_frame_rate {row.get('r_fps')}"
        warnings.append(f"variable frame rate ({detail})")
    if row.get("rotation"):
        warnings.append(f"rotation metadata ({row['rotation']} deg): the video path ignores it; "
                        "build-lmdb applies it")

    header, counted = row.get("nb_frames"), row.get("counted_frames")
    if header == 0 or counted == 0:
        return "zero_frames", ["no frames" + (f" ({row['decode_errors']})" if row.get("decode_errors") else "")], \
            warnings

    truncated = []
    if counted not in ("", None) and header not in ("", None) and counted < TRUNCATED_FRACTION * header:
        truncated.append(f"decoded {counted} of the {header} frames the header claims")
    if row.get("decode_errors"):
        truncated.append(f"decode errors: {row['decode_errors']}")
    if row.get("ends_early"):
        truncated.append("the file ends before the frames its header lists (cut off)")
    if truncated:
        return "truncated", truncated, warnings

    nvdec = nvdec_problems(row)
    if nvdec:
        return "nvdec_unsupported", nvdec, warnings
    return "ok", [], warnings


def nvdec_problems(row: dict) -> list[str]:
    """Why NVDEC would refuse this video (empty: it decodes). The rule is NVDEC_RULES."""
    codec = row.get("codec") or ""
    problems = []
    if codec not in NVDEC_CODECS:
        problems.append(f"codec {codec} has no NVDEC decoder")
    depth = row.get("bit_depth")
    if depth not in ("", None) and int(depth) > 8:
        problems.append(f"{depth}-bit samples ({row.get('pix_fmt')}); NVDEC path needs 8-bit")
    chroma = row.get("chroma") or ""
    if codec in ("h264", "hevc") and chroma != "4:2:0":
        problems.append(f"chroma {chroma or 'unknown'} ({row.get('pix_fmt')}); NVDEC needs 4:2:0")
    width, height = row.get("width") or 0, row.get("height") or 0
    if max(width, height) > NVDEC_MAX_SIDE:
        problems.append(f"frame {width}x{height} larger than {NVDEC_MAX_SIDE} on a side")
    if min(width, height) < NVDEC_MIN_SIDE:
        problems.append(f"frame {width}x{height} smaller than {NVDEC_MIN_SIDE} on a side")
    if width % 2 or height % 2:
        problems.append(f"odd frame size {width}x{height}")
    return problems


def validate(rows: list[dict], skipped_rows: list[str] = ()) -> dict:
    """The report: per-file verdicts, counts per bucket, warnings and the blocked files;
    `skipped_rows` ("line N: what is wrong") are the table's malformed rows, left out."""
    files, blocked = [], []
    counts: Counter = Counter({bucket: 0 for bucket in BUCKETS})
    warning_counts: Counter = Counter()
    for row in rows:
        bucket, reasons, warnings = judge(row)
        counts[bucket] += 1
        for warning in warnings:
            warning_counts["variable_frame_rate" if warning.startswith("variable") else "rotation"] += 1
        entry = dict(file=row["file"], bucket=bucket, reasons=reasons, warnings=warnings)
        files.append(entry)
        if bucket != "ok":
            blocked.append(entry)
    return {"format": "cstp-validate", "version": 1, "nvdec_rules": NVDEC_RULES,
            "counts": dict(files=len(rows), **{b: counts[b] for b in BUCKETS}),
            "warnings": dict(warning_counts), "blocked": [dict(file=e["file"], bucket=e["bucket"],
                                                                reason="; ".join(e["reasons"])) for e in blocked],
            "skipped_rows": list(skipped_rows), "files": files}


def blocklist_lines(report: dict) -> list[str]:
    return [f"{entry['file']}\t{entry['bucket']}: {_one_line(entry['reason'])}" for entry in report["blocked"]]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def summary_line(report: dict) -> str:
    counts = report["counts"]
    blocked = sum(counts[b] for b in BLOCKED)
    parts = ", ".join(f"{b} {counts[b]}" for b in BLOCKED if counts[b])
    warnings = ", ".join(f"{k} {v}" for k, v in sorted(report["warnings"].items()))
    skipped = len(report.get("skipped_rows", ()))
    return (f"files {counts['files']}: ok {counts['ok']}, blocked {blocked}" + (f" ({parts})" if parts else "")
            + (f"; warnings: {warnings}" if warnings else "")
            + (f"; {skipped} malformed table row{'s' * (skipped != 1)} skipped" if skipped else ""))


def write_outputs(report: dict, out_path, blocklist_path=None) -> None:
    _atomic_write(Path(out_path), json.dumps(report, indent=1) + "\n")
    if blocklist_path is not None:
        lines = blocklist_lines(report)
        _atomic_write(Path(blocklist_path), "".join(line + "\n" for line in lines))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
