"""Command-line parts of the dataset tools `probe`, `validate`, `lists` and `verify`
(registered in preprocessing/__main__.py by `add_tool_commands`).

Exit status of each: 0 done, 1 the data has problems (verify) or nothing could be
done, 2 bad arguments or missing input."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from .cli_args import add_command, human_bytes, positive_int, require_videos_and_list, split

PROBE_HELP = """\
Run ffprobe on every video (in parallel; one ffprobe process per video) and write
one row per file: codec, pix_fmt, bit depth, chroma, width, height (as stored),
rotation, avg and r_frame_rate, the header's frame count, duration, variable
frame rate (the two rates differ by over 1 %, or the first 300 packet timestamps
are unevenly spaced), audio-only, whether the file ends before the packets its
header lists (over the first 300), and readable + error. With --count-frames each file is also decoded once
(ffprobe -count_frames) for an exact count and any decode errors (slower).
Files: every video under --videos, or the paths of --list (a build-lmdb list);
a listed path that leaves --videos (absolute or '..') is skipped with its reason.
--out ending in .json writes JSON, anything else a TSV with a header line;
only the JSON form records the skipped entries ("skipped": [{"file", "reason"}]).
Feed the table to `validate`."""

PROBE_EXAMPLES = """\
examples:
  python -m preprocessing probe --videos data/UCF-101 --out data/ucf101.probe.tsv --workers 16
  python -m preprocessing probe --videos data/kinetics400 --list k400_train.txt --count-frames \\
      --out data/k400.probe.json"""

VALIDATE_HELP = """\
Judge a probe table: each file goes into one bucket, the first that applies:
unreadable, no_video (audio-only included), zero_frames, truncated (decoded
frames below 90 % of the header's count or decode errors, both need
`probe --count-frames`; or fewer packets than the header lists),
nvdec_unsupported, ok.
{rules}
Variable frame rate and rotation metadata are warnings, never blocked.
Writes the JSON report (--out) and a blocklist (--blocklist, default
<REPORT>.blocklist.txt): one blocked file per line, `path<TAB>bucket: reason`.
A malformed row (wrong number of fields, no file name, a number that is not
one) is reported with its line and skipped; the others are judged.
Exit status 0 (a summary line is printed), 2 when the table cannot be read (or is
over 1 GiB: refused from its size) or none of its rows is usable."""

VALIDATE_EXAMPLES = """\
examples:
  python -m preprocessing validate --probe data/ucf101.probe.tsv --out data/ucf101.validate.json
  python -m preprocessing validate --probe data/k400.probe.json --out k400.json --blocklist k400.blocked.txt"""

LISTS_HELP = """\
Write train/test lists from the official annotation files, with 0-based labels
and frame counts, in our format (`path label`: build-lmdb --list with the same
--videos) and in the reference project's format, plus classes.txt (line i =
class of label i) and missing.txt (annotated videos not found, or unreadable).
  ucf101       --annotations = the ucfTrainTestlist folder (classInd.txt, trainlist0K.txt,
               testlist0K.txt); writes train.txt, test.txt and trainlist0K_nframe.txt /
               testlist0K_nframe.txt (`Class/v_x.avi label nframes`, single spaces)
  hmdb51       --annotations = the folder of <class>_test_split{1,2,3}.txt (1 train, 2 test,
               0 unused); classes sorted by name; reference files as UCF's, paths without
               extension
  kinetics400  --annotations = a CSV (label,youtube_id,time_start,time_end,split) or a folder
               of them; videos <youtube_id>_<start:06d>_<end:06d>.mp4 under <split>/<label>/
               or anywhere under --videos; writes <split>.txt and <split>_list_label_nframe.txt
               (`val/<class>/<id>.mp4  label  nframes`, two spaces); classes sorted by name
Frame counts come from the container header (decoding when it has none, or always
with --count-frames); --no-frame-counts skips them and drops the nframes field
(reference files then lose `_nframe` in their names). Missing videos are
reported, never fatal. Exit 0, 1 when no annotated video was found, 2 bad input."""

LISTS_EXAMPLES = """\
examples:
  python -m preprocessing lists --dataset ucf101 --annotations data/ucfTrainTestlist \\
      --videos data/UCF-101 --out data/ucf101_lists --split 1
  python -m preprocessing lists --dataset hmdb51 --annotations data/testTrainMulti_7030_splits \\
      --videos data/hmdb51 --out data/hmdb51_lists
  python -m preprocessing lists --dataset kinetics400 --annotations data/kinetics400/annotations \\
      --videos data/kinetics400 --out data/k400_lists --workers 32"""

VERIFY_HELP = """\
Check an LMDB of JPEG frames end to end: the index entries exist and agree
(__len__, __keys__, __order__, __vlen__, __meta__), every listed entry exists and
no entry is left out, each entry's frame count matches, and every frame (or
--sample K per video, first and last included) passes the loader's JPEG check
and decodes with PIL. Prints each problem with the video's name, then a summary
with the database size (and the source videos' size with --videos).
Exit status 0 all good, 1 problems found, 2 the database cannot be opened."""

VERIFY_EXAMPLES = """\
examples:
  python -m preprocessing verify --db data/ucf101_256.lmdb --videos data/UCF-101
  python -m preprocessing verify --db data/k400_320.lmdb --sample 4 --report k400.verify.json"""


def add_tool_commands(commands) -> None:
    from .validate import NVDEC_RULES

    workers_default = os.cpu_count() or 1

    cmd = add_command(commands, "probe", "ffprobe every video into a table (codec, size, fps, frames, VFR, ...)",
                      PROBE_HELP, PROBE_EXAMPLES)
    cmd.add_argument("--videos", required=True, metavar="DIR", help="folder holding the videos (searched recursively)")
    cmd.add_argument("--list", metavar="FILE", help="only these videos (a build-lmdb list, paths relative to --videos)")
    cmd.add_argument("--out", required=True, metavar="TABLE", help="the table to write: .tsv (or any name) or .json")
    cmd.add_argument("--count-frames", action="store_true",
                     help="also decode each video once for an exact frame count and decode errors (slower)")
    cmd.add_argument("--workers", type=positive_int, default=workers_default, metavar="N",
                     help="ffprobe processes in parallel (default: %(default)s)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=run_probe, command_parser=cmd)

    cmd = add_command(commands, "validate",
                      "judge a probe table: report + blocklist (unreadable, truncated, NVDEC, ...)",
                      VALIDATE_HELP.format(rules=textwrap.fill(f"NVDEC rule: {NVDEC_RULES}.", 80)), VALIDATE_EXAMPLES)
    cmd.add_argument("--probe", required=True, metavar="TABLE", help="a table written by `probe` (.tsv or .json)")
    cmd.add_argument("--out", required=True, metavar="REPORT.json", help="the JSON report to write")
    cmd.add_argument("--blocklist", metavar="FILE", help="the blocklist to write (default: <REPORT>.blocklist.txt)")
    cmd.set_defaults(run=run_validate, command_parser=cmd)

    cmd = add_command(commands, "lists", "train/test lists from UCF101 / HMDB51 / Kinetics-400 annotations",
                      LISTS_HELP, LISTS_EXAMPLES)
    cmd.add_argument("--dataset", required=True, choices=("ucf101", "hmdb51", "kinetics400"))
    cmd.add_argument("--annotations", required=True, metavar="PATH",
                     help="the official annotation folder (UCF101, HMDB51) or CSV file/folder (Kinetics-400)")
    cmd.add_argument("--videos", required=True, metavar="DIR", help="folder holding the videos")
    cmd.add_argument("--out", required=True, metavar="DIR", help="folder to write the lists into")
    cmd.add_argument("--split", type=split, default=1, metavar="K", help="UCF101/HMDB51 split 1-3 (default: 1)")
    counts = cmd.add_mutually_exclusive_group()
    counts.add_argument("--no-frame-counts", dest="frame_counts", action="store_false",
                        help="do not probe the videos; lists without the nframes field")
    counts.add_argument("--count-frames", action="store_true",
                        help="exact counts by decoding every video (default: the header's count)")
    cmd.add_argument("--workers", type=positive_int, default=workers_default, metavar="N",
                     help="ffprobe processes in parallel (default: %(default)s)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=run_lists, command_parser=cmd)

    cmd = add_command(commands, "verify", "check that every entry and frame of an LMDB reads and decodes",
                      VERIFY_HELP, VERIFY_EXAMPLES)
    cmd.add_argument("--db", required=True, metavar="DB", help="the LMDB (folder) to check")
    cmd.add_argument("--videos", metavar="DIR", help="the source videos, to compare sizes (from __meta__ source)")
    cmd.add_argument("--sample", type=positive_int, metavar="K",
                     help="check K frames per video, spread evenly (default: every frame)")
    cmd.add_argument("--report", metavar="FILE.json", help="also write the full report as JSON")
    cmd.add_argument("--decode", action="store_true",
                     help="decode every frame whole, in parallel, and write the damaged videos to --blocklist "
                          "(which build-lmdb --blocklist, data.blocklist and evaluate.py --blocklist honour)")
    cmd.add_argument("--blocklist", metavar="FILE", help="with --decode: where (default: DB.blocklist.txt)")
    cmd.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                     help="with --decode: decoding processes (default: %(default)s)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=run_verify, command_parser=cmd)


# --------------------------------------------------------------------------- runners

def run_probe(args, parser) -> int:
    from .build_lmdb import shown
    from .probe import ProbeError, run_probe as probe

    require_videos_and_list(args, parser)
    try:
        result = probe(args.videos, args.out, list_file=args.list, workers=args.workers,
                       count_frames=args.count_frames, progress=not args.quiet)
    except ProbeError as err:
        print(f"probe: error: {err}", file=sys.stderr)
        return 2
    rows, skipped = result["rows"], result["skipped"]
    for entry in skipped:
        print(f"skipped {shown(entry['file'])}: {entry['reason']}", file=sys.stderr)
    unreadable = sum(1 for row in rows if not row["readable"])
    print(f"probed {len(rows)} files ({unreadable} unreadable)" + (f", skipped {len(skipped)}" if skipped else "")
          + f", {result['seconds']:.1f} s -> {args.out}")
    return 0


def run_validate(args, parser) -> int:
    from .probe import read_table
    from .validate import summary_line, validate, write_outputs

    if not Path(args.probe).is_file():
        parser.error(f"--probe {args.probe}: no such file")
    skipped = []   # malformed rows: reported, the others judged
    try:
        rows = read_table(args.probe, skipped)
    except (ValueError, KeyError, TypeError, OSError) as err:
        print(f"validate: error: cannot read the probe table {args.probe}: {err}", file=sys.stderr)
        return 2
    for problem in skipped:
        print(f"validate: skipped {args.probe}, {problem}", file=sys.stderr)
    if skipped and not rows:
        print(f"validate: error: no row of the probe table {args.probe} is usable ({len(skipped)} malformed)",
              file=sys.stderr)
        return 2
    report = validate(rows, skipped)
    blocklist = args.blocklist or str(Path(args.out).with_suffix("")) + ".blocklist.txt"
    write_outputs(report, args.out, blocklist)
    for entry in report["blocked"]:
        print(f"blocked {entry['file']}: {entry['bucket']}: {entry['reason']}", file=sys.stderr)
    print(f"{summary_line(report)} -> {args.out}, blocklist {blocklist}")
    return 0


def run_lists(args, parser) -> int:
    from .lists import ListsError, make_lists

    if not Path(args.videos).is_dir():
        parser.error(f"--videos {args.videos}: no such folder")
    if not Path(args.annotations).exists():
        parser.error(f"--annotations {args.annotations}: not found")
    try:
        summary = make_lists(args.dataset, args.annotations, args.videos, args.out, split=args.split,
                             frame_counts=args.frame_counts, exact_counts=args.count_frames,
                             workers=args.workers, progress=not args.quiet)
    except ListsError as err:
        print(f"lists: error: {err}", file=sys.stderr)
        return 2
    for missing in summary["missing"][:20]:
        print(f"missing {missing['file']}: {missing['reason']}", file=sys.stderr)
    if len(summary["missing"]) > 20:
        print(f"... and {len(summary['missing']) - 20} more (see {args.out}/missing.txt)", file=sys.stderr)
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    parts = ", ".join(f"{part} {info['videos']} ({info['ours']}, {info['reference']})"
                      for part, info in summary["written"].items())
    print(f"{summary['dataset']}: {summary['classes']} classes, {parts}, missing {len(summary['missing'])} "
          f"-> {args.out}")
    return 0 if any(info["videos"] for info in summary["written"].values()) else 1


def run_verify(args, parser) -> int:
    from .verify import VerifyError, verify_db

    if args.videos is not None and not Path(args.videos).is_dir():
        parser.error(f"--videos {args.videos}: no such folder")
    try:
        # --decode: the structure (one frame per video) here, every frame in parallel below
        report = verify_db(args.db, videos_dir=args.videos, sample=1 if args.decode else args.sample,
                           progress=not args.quiet and not args.decode)
    except (VerifyError, ValueError) as err:   # DataFaultError (a cut data.mdb) is a ValueError
        print(f"verify: error: {err}", file=sys.stderr)
        return 2
    if args.decode:
        import time

        from .decode_check import decode_check_lmdb
        start = time.perf_counter()
        damaged = decode_check_lmdb(args.db, workers=args.workers, progress=not args.quiet)
        report["seconds"] = round(report["seconds"] + time.perf_counter() - start, 2)
        found = [dict(video=d["name"], problem=d["problem"]) for d in damaged]   # malformed records: both
        report["problems"] = [p for p in report["problems"] if " frame " not in f" {p['problem']}" and
                              p not in found] + found
        report["frames_checked"] = report["frames"]
        report["damaged"] = damaged
        report_damaged("verify --decode", args.db, args.blocklist, damaged, quiet_ok=True)
    for item in report["problems"]:
        print(f"problem {item['video']}: {item['problem']}")
    for source in report["missing_sources"][:20]:
        print(f"warning: source video not found: {source}", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    sizes = report["sizes"]
    size_text = f"DB {human_bytes(sizes['db_bytes'])}"
    if "source_bytes" in sizes:
        size_text += f", source videos {human_bytes(sizes['source_bytes'])}"
        if sizes.get("ratio"):
            size_text += f" (x{sizes['ratio']:.2f})"
    status = "OK" if not report["problems"] else f"{len(report['problems'])} PROBLEMS"
    print(f"verify {status}: {report['videos']} videos, {report['frames']} frames "
          f"({report['frames_checked']} checked), layout {report['layout']}, {size_text}, {report['seconds']:.1f} s")
    return 1 if report["problems"] else 0


def report_damaged(command: str, data_path: str, blocklist, damaged: list[dict], quiet_ok: bool = False) -> int:
    """Print the damaged videos and write them as a blocklist; exit status 1 if any."""
    from .decode_check import default_blocklist_path, write_damaged_blocklist

    blocklist = blocklist or default_blocklist_path(data_path)
    for d in damaged:
        print(f"damaged {d['entry']}: {d['problem']}")
    write_damaged_blocklist(blocklist, damaged)
    if damaged or not quiet_ok:
        print(f"{command}: {len(damaged)} damaged videos -> blocklist {blocklist} (pass it as data.blocklist, "
              "build-lmdb --blocklist or evaluate.py --blocklist)")
    return 1 if damaged else 0

