"""Command line: `python -m preprocessing <command> ...`; see `--help`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from .ffmpeg_io import INSTALL_HINT
from .ffmpeg_tools import missing_tools
from .cli_args import (PROG, add_command, at_least_two, crf, even_short_side, fps, human_bytes, non_negative_int, positive_int,
                       quality, require_videos_and_list, short_side)
from .tools_cli import add_tool_commands

BUILD_LMDB_HELP = """\
Decode every video into JPEG frames (one ffmpeg process per video, several in
parallel) and store them in an LMDB, the format read by pipelines/lmdb_store.py:
key %09d = a video's frames (layout 2: a small header, and each frame under its
own key %09d/%06d, so training reads only the frames it needs), plus index entries (__keys__,
__len__, __order__, __vlen__, __meta__, __classes__, __info__).

Without --list, every video file under --videos is used (recursively, sorted);
its class is the folder it is in. With --list, each line is
`relative/path.ext [label [extra...]]` (UCF-style single spaces and
Kinetics-style double spaces both work; separate with TABs if a path contains
spaces); a missing label is the index of the video's folder among the sorted
folder names. Class names (__classes__) follow the list's labels when it labels
every video and the labels match the folders one-to-one; otherwise they are the
sorted folder names. A video's name in the database is its path relative to
--videos, without extension (e.g. ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01).

Videos that cannot be converted are skipped, each with a one-line reason; the
build carries on. Files in --blocklist (e.g. written by `validate`) are not
decoded at all. A report is written to <DB>.report.json: `ok` (names) and
`failed` (file and reason, blocklisted files included).

Resumable: the database is built in <DB>.partial, one video per transaction,
and renamed to <DB> when complete. After a crash, a kill or Ctrl-C, run the
same command again: it continues where it stopped (videos already done are not
decoded again) and gives the same database as an uninterrupted build. A
.partial made with other settings or another list is refused (--overwrite
deletes it). The LMDB map starts at --map-size-mb and doubles whenever full.
Exit status: 0 finished (even with skipped videos), 1 no video could be
converted, 2 bad arguments or missing input, 130 interrupted (rerun to continue)."""

BUILD_LMDB_EXAMPLES = """\
examples:
  # UCF101 as in the reference: short side 256, 25 fps
  python -m preprocessing build-lmdb --videos data/UCF-101 --out data/ucf101_256.lmdb \\
      --short-side 256 --fps 25
  # Kinetics-400 from its list file, short side 320, 30 fps, 16 decoders
  python -m preprocessing build-lmdb --videos data/kinetics400 --list data/k400_train.txt \\
      --out data/k400_320.lmdb --short-side 320 --fps 30 --workers 16
  # the synthetic demo set, small frames
  python -m preprocessing build-lmdb --videos data/demo/videos --out data/demo.lmdb --short-side 112
  # skip what `validate` blocked; after Ctrl-C or a crash, the same command continues
  python -m preprocessing build-lmdb --videos data/UCF-101 --out data/ucf101_256.lmdb --short-side 256 \\
      --fps 25 --blocklist data/ucf101.validate.blocklist.txt"""

DEMO_DATA_HELP = """\
Write a small synthetic action dataset of real H.264 mp4 files: 6 classes
(move_left, move_right, move_up, move_down, rotate, pulse) of a coloured shape
in front of a moving sky-and-ground background, 2-4 s at 25 fps, small frames.
Layout: DIR/videos/<class>/<class>_<nnn>.mp4, DIR/classes.txt, DIR/train.txt and
DIR/test.txt (`<class>/<file>.mp4 <label>`, about 80/20 per class).
The same --seed always gives the same dataset."""

DEMO_DATA_EXAMPLES = """\
examples:
  python -m preprocessing demo-data --out data/demo
  python -m preprocessing demo-data --out /tmp/demo --videos-per-class 20 --seed 1 --workers 4"""

PROOF_DATA_HELP = """\
Write the proof dataset (preprocessing/proof_data.py), on which every CSTP pretext
label can be read from the pixels: 6 motion classes (blink, glide, orbit, pulse,
spin, swing) of four shapes over a map that codes position in grey level and
saturation and time in a turning hue, 144 frames of 96x72, H.264 mp4.
Layout: DIR/videos/<class>/<class>_<nnn>.mp4, DIR/classes.txt, DIR/train.txt and
DIR/test.txt (about 80/20 per class), and DIR/proof_dataset.json, which says what made it.
`make demo` and `make proof` use it (40 videos per class).
Does nothing when DIR already holds this generator's dataset of that size and seed;
a dataset from another generator version, size or seed is deleted and rebuilt, with the
LMDBs in DIR; a non-empty DIR that is not a proof dataset is refused (exit 2)."""

PROOF_DATA_EXAMPLES = """\
examples:
  python -m preprocessing proof-data --out data/proof
  python -m preprocessing build-lmdb --videos data/proof/videos --list data/proof/train.txt \\
      --out data/proof/train.lmdb --workers 2"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Offline data tools for CSTP-DALI: probe and validate videos, build LMDBs of JPEG frames, "
                    "transcode for NVDEC, split lists, verify, make demo data.",
        epilog="Run `%(prog)s <command> --help` for a command's options and examples.")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_build_lmdb(commands)
    _add_convert(commands)
    _add_demo_data(commands)
    _add_proof_data(commands)
    _add_index_videos(commands)
    _add_transcode(commands)
    add_tool_commands(commands)  # probe, validate, lists, verify: preprocessing/tools_cli.py
    return parser


def _add_build_lmdb(commands) -> None:
    cmd = add_command(commands, "build-lmdb", "convert a folder of videos into an LMDB of JPEG frames",
                      BUILD_LMDB_HELP, BUILD_LMDB_EXAMPLES)
    cmd.add_argument("--videos", required=True, metavar="DIR", help="folder holding the videos (searched recursively)")
    cmd.add_argument("--out", required=True, metavar="DB", help="the LMDB to create (a folder)")
    cmd.add_argument("--list", metavar="FILE", help="list of videos to convert, relative to --videos, "
                                                    "with optional labels (default: all videos, sorted)")
    cmd.add_argument("--short-side", type=short_side, metavar="N",
                     help="resize so the shorter side is N pixels, keeping the aspect (default: original size)")
    cmd.add_argument("--fps", type=fps, metavar="F", help="resample to F frames per second (default: keep every frame)")
    cmd.add_argument("--encoder", choices=("turbo", "ffmpeg"), default="turbo",
                     help="JPEG encoder: turbo = libjpeg-turbo in the worker on ffmpeg's raw frames (builds "
                          "~1.6x faster than the reference's route, database ~1.5x larger at equal fidelity); "
                          "ffmpeg = ffmpeg's MJPEG encoder, as the reference (default: %(default)s)")
    cmd.add_argument("--quality", type=quality, metavar="Q",
                     help="JPEG quality: with --encoder turbo libjpeg quality 1-100 (default 94, at least as "
                          "faithful as the reference's -q:v 2); with --encoder ffmpeg its -q:v, 2 (best, the "
                          "reference's choice) to 31 (default 2)")
    cmd.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                     help="videos decoded in parallel (default: number of CPUs, %(default)s here)")
    cmd.add_argument("--blocklist", metavar="FILE",
                     help="videos not to convert: one path (relative to --videos) per line, optionally "
                          "followed by a TAB and the reason, as `validate` writes it")
    cmd.add_argument("--map-size-mb", type=positive_int, metavar="MB",
                     help="initial LMDB map size in MiB; it doubles whenever full "
                          "(default: 8x the source videos' size + 256)")
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace an existing database at --out, and discard a <DB>.partial that was started "
                          "with other settings (a matching one is continued)")
    cmd.add_argument("--layout", type=int, choices=(1, 2), default=2,
                     help="layout of the video entries: 2 = a key per frame, so training reads only the frames "
                          "a sample needs; 1 = one msgpack list per video, which the reference project's own "
                          "loader reads (every sample then reads its whole video) (default: %(default)s)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar (skipped videos are still reported)")
    cmd.set_defaults(run=run_build_lmdb, command_parser=cmd)


CONVERT_HELP = """\
Rewrite an LMDB of JPEG frames in the whole-video layout (built by build-lmdb
before layout version 2, or by the reference project's make_lmdb_kin.py) in
layout version 2, in which training reads only the frames a sample needs instead
of its whole video. Frames are copied byte for byte; keys, ids and index entries
stay as they are. The old database is not changed.

Resumable: the new database grows in <NEW>.partial, one video per transaction;
after a crash, a kill or Ctrl-C, run the same command again to continue.
Exit status: 0 done (even with skipped unreadable entries), 2 bad arguments or
input, 130 interrupted (rerun to continue)."""

CONVERT_EXAMPLES = """\
examples:
  python -m preprocessing convert --db data/k400_320.lmdb --out data/k400_320_v2.lmdb
  python -m preprocessing verify --db data/k400_320_v2.lmdb --sample 4"""


def _add_convert(commands) -> None:
    cmd = add_command(commands, "convert", "rewrite an old whole-video LMDB in the frame-per-key layout (v2)",
                      CONVERT_HELP, CONVERT_EXAMPLES)
    cmd.add_argument("--db", required=True, metavar="OLD", help="the LMDB to convert (left unchanged)")
    cmd.add_argument("--out", required=True, metavar="NEW", help="the LMDB to create (a folder)")
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace an existing database at --out, and discard a <NEW>.partial of another source")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=run_convert, command_parser=cmd)


def run_convert(args, parser) -> int:
    from .build_lmdb import BuildError
    from .convert_lmdb import ConvertInterrupted, convert_lmdb

    try:
        with _sigterm_as_interrupt():
            report = convert_lmdb(args.db, args.out, progress=not args.quiet, overwrite=args.overwrite)
    except BuildError as err:   # ConvertError, OutputExistsError
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    except ConvertInterrupted as err:
        print(f"\nconvert: {err}", file=sys.stderr)
        return 130
    print(f"videos converted {report['converted']} / skipped {len(report['failed'])}, "
          f"DB {human_bytes(report['db_bytes'])}, {report['seconds']:.1f} s -> {args.out}")
    return 0


def _add_demo_data(commands) -> None:
    _add_synthetic_dataset(commands, "demo-data", "write a small synthetic action dataset (6 classes, mp4)",
                           DEMO_DATA_HELP, DEMO_DATA_EXAMPLES, run_demo_data,
                           videos_per_class=(positive_int, 12, "videos per class"))


def _add_proof_data(commands) -> None:
    _add_synthetic_dataset(commands, "proof-data", "write the proof dataset of make demo / make proof (6 classes, mp4)",
                           PROOF_DATA_HELP, PROOF_DATA_EXAMPLES, run_proof_data,
                           videos_per_class=(at_least_two, 40, "videos per class, at least 2"))


def _add_synthetic_dataset(commands, name: str, help_text: str, description: str, epilog: str, run,
                           videos_per_class: tuple) -> None:
    """The options that both synthetic-dataset commands take."""
    kind, default, help_per_class = videos_per_class
    cmd = add_command(commands, name, help_text, description, epilog)
    cmd.add_argument("--out", required=True, metavar="DIR", help="folder to write the dataset into")
    cmd.add_argument("--videos-per-class", type=kind, default=default, metavar="N",
                     help=help_per_class + " (default: %(default)s)")
    cmd.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                     help="random seed; the same seed gives the same dataset (default: %(default)s)")
    cmd.add_argument("--workers", type=positive_int, default=2, metavar="N",
                     help="videos rendered and encoded in parallel (default: %(default)s)")
    cmd.set_defaults(run=run, command_parser=cmd)


INDEX_VIDEOS_HELP = """\
Write the JSON index that the video-file data path reads (train.py
data.path=INDEX.json): per video its name, file, label, exact frame count (each
file is decoded once with ffprobe), size, fps and codec. Files that cannot be
decoded to the end, or carry rotation metadata, are listed under "failed" with a
reason and left out. On a CPU, DALI decodes only VP8, VP9 and MJPEG; H.264,
HEVC and MPEG-4 need a GPU (or an LMDB: build-lmdb).
Labels and classes follow the same rules as build-lmdb."""

INDEX_VIDEOS_EXAMPLES = """\
examples:
  python -m preprocessing index-videos --videos data/kinetics400 --list k400_train.txt --out data/k400_videos.json
  python -m preprocessing index-videos --videos data/demo_vp9 --out data/demo_vp9.json"""


def _add_index_videos(commands) -> None:
    cmd = add_command(commands, "index-videos", "index a folder of videos for the video-file data path",
                      INDEX_VIDEOS_HELP, INDEX_VIDEOS_EXAMPLES)
    cmd.add_argument("--videos", metavar="DIR", help="folder holding the videos (searched recursively)")
    cmd.add_argument("--out", required=True, metavar="INDEX.json", help="the index file to write (to check, with --verify)")
    cmd.add_argument("--verify", action="store_true",
                     help="check the existing index --out instead: decode every file once, report the damaged, "
                          "changed or vanished ones and write them to --blocklist (exit 1 if any)")
    cmd.add_argument("--blocklist", metavar="FILE",
                     help="with --verify: where to write the blocklist (default: INDEX.json.blocklist.txt)")
    cmd.add_argument("--list", metavar="FILE", help="list of videos, relative to --videos, with optional labels")
    cmd.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                     help="videos probed in parallel (default: %(default)s)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=run_index_videos, command_parser=cmd)


TRANSCODE_HELP = """\
Write an NVDEC-friendly copy of a video dataset, for the video-file data path
(fn.decoders.video on a GPU): every video becomes OUT/<same path>.mp4 in H.264
(libx264), 8-bit yuv420p, at a constant frame rate (--fps, default: the
source's average rate), with a keyframe every 16 frames (no scene-cut
keyframes), the rotation metadata applied to the pixels and removed, even frame
sizes (--short-side, default: the source size), no audio.

Videos from --videos (recursively, sorted) or from --list; with --list, OUT gets
a copy of the list with the new .mp4 paths (failed videos left out). One ffmpeg
per video, --workers in parallel. Resumable: outputs are written under a
temporary name, checked with ffprobe, then renamed, so after a crash or Ctrl-C
the same command skips what is finished. The settings are kept in
OUT/transcode.settings.json; a rerun with other settings is refused (unless
--overwrite, which transcodes everything again). Videos that cannot be
transcoded are skipped with a reason; the report is OUT/transcode.report.json
(`ok` and `failed` with file and reason).
Exit status: 0 finished (even with skipped videos), 1 no video could be
transcoded, 2 bad arguments or missing input, 130 interrupted (rerun to continue)."""

TRANSCODE_EXAMPLES = """\
examples:
  # Kinetics-400 for the GPU video path: short side 320, 30 fps
  python -m preprocessing transcode --videos data/kinetics400 --out data/k400_nvdec \\
      --short-side 320 --fps 30 --workers 16
  # UCF101 at 256, keeping each video's own rate, then index it for train.py
  python -m preprocessing transcode --videos data/UCF-101 --out data/ucf101_nvdec --short-side 256
  python -m preprocessing index-videos --videos data/ucf101_nvdec --out data/ucf101_nvdec.json"""


def _add_transcode(commands) -> None:
    cmd = add_command(commands, "transcode", "copy a video dataset as NVDEC-friendly H.264 (CFR, yuv420p, GOP 16)",
                      TRANSCODE_HELP, TRANSCODE_EXAMPLES)
    cmd.add_argument("--videos", required=True, metavar="DIR", help="folder holding the videos (searched recursively)")
    cmd.add_argument("--out", required=True, metavar="DIR", help="folder to write the transcoded videos into "
                                                                 "(not inside --videos)")
    cmd.add_argument("--list", metavar="FILE", help="only these videos (a build-lmdb list, paths relative to --videos)")
    cmd.add_argument("--short-side", type=even_short_side, metavar="N",
                     help="resize so the shorter side is N pixels (even), keeping the aspect "
                          "(default: the source size, made even)")
    cmd.add_argument("--fps", type=fps, metavar="F",
                     help="constant output frame rate (default: the source's average rate, made constant)")
    cmd.add_argument("--crf", type=crf, default=18, metavar="Q",
                     help="x264 quality, 0 (lossless) to 51; lower is better and larger (default: %(default)s)")
    cmd.add_argument("--preset", default="fast",
                     choices=("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"),
                     help="x264 speed/size trade-off (default: %(default)s)")
    cmd.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                     help="videos transcoded in parallel (default: number of CPUs, %(default)s here)")
    cmd.add_argument("--overwrite", action="store_true",
                     help="transcode every video again, replacing outputs (also when the settings changed)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar (skipped videos are still reported)")
    cmd.set_defaults(run=run_transcode, command_parser=cmd)


# --------------------------------------------------------------------------- commands


def run_index_videos(args, parser) -> int:
    from .build_lmdb import shown
    from .index_videos import index_videos

    if args.verify:
        from .tools_cli import report_damaged
        from .decode_check import decode_check_index
        if not Path(args.out).is_file():
            parser.error(f"--out {args.out}: no such index to verify")
        return report_damaged("index-videos --verify", args.out, args.blocklist,
                              decode_check_index(args.out, workers=args.workers, progress=not args.quiet))
    if not args.videos:
        parser.error("--videos is required (unless --verify)")
    require_videos_and_list(args, parser)
    if not args.out.endswith(".json"):
        parser.error("--out must end in .json (that is how train.py tells an index from an LMDB)")
    index = index_videos(args.videos, args.out, list_file=args.list, workers=args.workers,
                         progress=not args.quiet)
    for failure in index["failed"]:
        print(f"skipped {shown(failure['file'])}: {failure['reason']}", file=sys.stderr)
    print(f"videos indexed {len(index['videos'])} / skipped {len(index['failed'])}, "
          f"{index['seconds']:.1f} s -> {args.out}")
    return 0 if index["videos"] else 1

def run_build_lmdb(args, parser) -> int:
    from .build_lmdb import BuildError, BuildInterrupted, build_lmdb  # imported here so `--help` stays fast

    from .ffmpeg_io import resolve_quality
    try:
        resolve_quality(args.encoder, args.quality)  # its range depends on the encoder
    except ValueError as err:
        parser.error(f"argument --quality: {err}")
    require_videos_and_list(args, parser)
    if args.blocklist is not None and not Path(args.blocklist).is_file():
        parser.error(f"--blocklist {args.blocklist}: no such file")
    map_size = None if args.map_size_mb is None else args.map_size_mb << 20
    try:
        with _sigterm_as_interrupt():
            report = build_lmdb(args.videos, args.out, list_file=args.list, short_side=args.short_side,
                                fps=args.fps, quality=args.quality, encoder=args.encoder, workers=args.workers,
                                progress=not args.quiet, layout=args.layout,
                                overwrite=args.overwrite, map_size=map_size, blocklist=args.blocklist)
    except BuildError as err:
        print(f"build-lmdb: error: {err}", file=sys.stderr)
        return 2
    except BuildInterrupted as err:
        print(f"\nbuild-lmdb: {err}", file=sys.stderr)
        return 130
    counts = report["counts"]
    print(f"videos ok {counts['ok']} / skipped {counts['failed']}, frames {counts['frames']}, "
          f"DB {human_bytes(report['db_bytes'])}, {report['seconds']:.1f} s -> {args.out} "
          f"(report: {args.out}.report.json)")
    if counts["ok"] == 0:
        print("build-lmdb: error: no video could be converted; see the reasons above or in the report",
              file=sys.stderr)
        return 1
    return 0


def run_transcode(args, parser) -> int:
    from .transcode import REPORT_NAME, TranscodeError, TranscodeInterrupted, transcode_dataset

    require_videos_and_list(args, parser)
    try:
        with _sigterm_as_interrupt():
            report = transcode_dataset(args.videos, args.out, list_file=args.list, short_side=args.short_side,
                                       fps=args.fps, crf=args.crf, preset=args.preset, workers=args.workers,
                                       progress=not args.quiet, overwrite=args.overwrite)
    except TranscodeError as err:
        print(f"transcode: error: {err}", file=sys.stderr)
        return 2
    except TranscodeInterrupted as err:
        print(f"\ntranscode: {err}", file=sys.stderr)
        return 130
    counts = report["counts"]
    print(f"videos ok {counts['ok']} ({counts['transcoded']} transcoded now, {counts['already_done']} already done) "
          f"/ skipped {counts['failed']}, {report['seconds']:.1f} s -> {args.out} (report: {args.out}/{REPORT_NAME})")
    if counts["ok"] == 0:
        print("transcode: error: no video could be transcoded; see the reasons above or in the report",
              file=sys.stderr)
        return 1
    return 0


def run_demo_data(args, parser) -> int:
    from .demo_data import generate_demo_dataset

    try:
        summary = generate_demo_dataset(args.out, videos_per_class=args.videos_per_class, seed=args.seed,
                                        workers=args.workers, progress=True)
    except (RuntimeError, OSError) as err:
        print(f"demo-data: error: {err}", file=sys.stderr)
        return 1
    print(f"demo data: {summary['videos']} videos ({summary['train']} train / {summary['test']} test), "
          f"{len(summary['classes'])} classes, {summary['frames']} frames, {summary['seconds']:.1f} s "
          f"-> {summary['out_dir']}")
    return 0


def run_proof_data(args, parser) -> int:
    from . import proof_data

    say = lambda message: print(f"proof-data: {message}", flush=True)  # noqa: E731
    try:
        summary = proof_data.ensure_proof_dataset(args.out, args.videos_per_class, seed=args.seed,
                                                  workers=args.workers, log=say, progress=True)
    except proof_data.NotAProofDataset as err:
        print(f"proof-data: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:
        print(f"proof-data: error: {err}", file=sys.stderr)
        return 1
    if summary is None:
        say(f"{args.out} already holds this dataset ({args.videos_per_class} videos per class, seed {args.seed}): "
            f"nothing to do")
    else:
        say(f"{summary['videos']} videos ({summary['train']} train / {summary['test']} test), "
            f"{summary['seconds']:.0f} s -> {args.out}")
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a job scheduler's stop, `kill`) ends a long command like Ctrl-C: it
    saves what is done and says how to continue, instead of dying mid-write."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _TqdmLogHandler(logging.Handler):
    """Log lines that do not tear the progress bar apart."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _configure_logging() -> None:
    handler = _TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("preprocessing")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"{PROG}: error: {' and '.join(missing)} not found. This tool needs the ffmpeg binaries: "
              f"{INSTALL_HINT}.", file=sys.stderr)
        return 2
    _configure_logging()
    try:
        return args.run(args, args.command_parser)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
