"""`lists`: train/test lists from the official annotation files of UCF101, HMDB51 and Kinetics-400.

Inputs (--annotations):
    ucf101       the folder of ucfTrainTestlist: classInd.txt ("1 ApplyEyeMakeup", 1-based),
                 trainlist0K.txt ("Class/v_x.avi 1", 1-based), testlist0K.txt ("Class/v_x.avi")
    hmdb51       the folder of <class>_test_split{1,2,3}.txt, lines "video.avi 1|2|0"
                 (1 train, 2 test, 0 unused); classes are the sorted class names
    kinetics400  a CSV file (or a folder of them: train.csv, validate.csv, ...) with the
                 header label,youtube_id,time_start,time_end,split; videos are named
                 <youtube_id>_<start:06d>_<end:06d>.mp4 under <split>/<label>/ (label with
                 spaces or underscores), or anywhere under --videos by that name;
                 classes are the sorted labels

Outputs (--out), labels always 0-based, classes.txt giving the class of each label:
    <part>.txt       ours: "path label" (TAB-separated when the path has spaces), usable as
                     `build-lmdb --list` / `index-videos --list` with the same --videos
    reference format, as the reference project reads it (docs/data.md#list-formats):
      ucf101         trainlist0K_nframe.txt / testlist0K_nframe.txt: "Class/v_x.avi label nframes"
      hmdb51         the same names: "class/video label nframes" (no extension, like HMDB51_labels)
      kinetics400    <split>_list_label_nframe.txt: "<split>/<class>/<id>.mp4  label  nframes" (two spaces)
    Without frame counts (--no-frame-counts) the reference files drop the nframes field and
    lose the "_nframe" in their names (trainlist0K.txt, val_list_label.txt).
    missing.txt      annotated videos not found under --videos (or unreadable when counting)

Frame counts come from the container header (ffprobe nb_frames), or from decoding
the file when the header has none or with --count-frames.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .build_lmdb import find_videos, outside_problem
from .ffmpeg_io import summarize_stderr
from .ffmpeg_tools import executable

DATASETS = ("ucf101", "hmdb51", "kinetics400")
FRAME_COUNT_TIMEOUT_S = 600
MAX_ANNOTATION_BYTES = 256 * 1024 * 1024


class ListsError(RuntimeError):
    """Annotations that cannot be used (missing file, bad line); says which and where."""


@dataclass
class Entry:
    """One annotated video: `ref` is its path as the annotation names it, `source`
    the path found under --videos (None when missing)."""
    part: str
    ref: str
    label: int
    source: str | None = None
    frames: int | None = None


@dataclass
class Lists:
    dataset: str
    classes: list
    entries: list
    parts: list                   # output parts in order (train, test / the Kinetics splits)
    reference_names: dict         # part -> reference file name, (with counts, without counts)
    reference_sep: str = " "
    reference_strip_ext: bool = False
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- reading annotation text

def _read_text(path: Path) -> str:
    """An annotation file's text, at most MAX_ANNOTATION_BYTES; bytes that are not UTF-8 become U+FFFD."""
    if not path.is_file():
        raise ListsError(f"annotation file not found: {path}")
    if path.stat().st_size > MAX_ANNOTATION_BYTES:
        raise ListsError(f"{path}: larger than {MAX_ANNOTATION_BYTES >> 20} MiB; not an annotation file")
    return path.read_text(encoding="utf-8-sig", errors="replace")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    text = _read_text(path)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


# --------------------------------------------------------------------------- UCF101

def ucf101_entries(annotations, split: int) -> Lists:
    root = Path(annotations)
    if not root.is_dir():
        raise ListsError(f"--annotations {root}: expected the ucfTrainTestlist folder (classInd.txt, "
                         "trainlist0K.txt, testlist0K.txt)")
    class_ids = {}
    for line_no, line in _read_lines(root / "classInd.txt"):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ListsError(f"{root / 'classInd.txt'}, line {line_no}: expected '<1-based id> <ClassName>', "
                             f"got {line!r}")
        class_ids[int(fields[0])] = fields[1]
    if sorted(class_ids) != list(range(1, len(class_ids) + 1)):
        raise ListsError(f"{root / 'classInd.txt'}: ids are not 1..{len(class_ids)}")
    classes = [class_ids[i] for i in range(1, len(class_ids) + 1)]
    label_of = {name.lower(): i for i, name in enumerate(classes)}

    entries, notes = [], []
    for part, name in (("train", f"trainlist{split:02d}.txt"), ("test", f"testlist{split:02d}.txt")):
        path = root / name
        for line_no, line in _read_lines(path):
            fields = line.split()
            ref = fields[0].replace("\\", "/")
            folder = PurePosixPath(ref).parent.name
            if folder.lower() not in label_of:
                raise ListsError(f"{path}, line {line_no}: class folder {folder!r} is not in classInd.txt")
            label = label_of[folder.lower()]
            if len(fields) > 1:
                if not fields[1].isdigit():
                    raise ListsError(f"{path}, line {line_no}: label {fields[1]!r} is not a 1-based integer")
                if int(fields[1]) - 1 != label:
                    raise ListsError(f"{path}, line {line_no}: label {fields[1]} says class "
                                     f"{class_ids.get(int(fields[1]), '?')!r} but the folder is {folder!r}")
            entries.append(Entry(part=part, ref=ref, label=label))
    return Lists("ucf101", classes, entries, ["train", "test"],
                 {"train": (f"trainlist{split:02d}_nframe.txt", f"trainlist{split:02d}.txt"),
                  "test": (f"testlist{split:02d}_nframe.txt", f"testlist{split:02d}.txt")}, notes=notes)


# --------------------------------------------------------------------------- HMDB51

_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")


def hmdb51_entries(annotations, split: int) -> Lists:
    root = Path(annotations)
    if not root.is_dir():
        raise ListsError(f"--annotations {root}: expected the folder of <class>_test_split{{1,2,3}}.txt files")
    files = {}
    for path in root.iterdir():
        match = _HMDB_FILE.match(path.name)
        if match and int(match.group("split")) == split:
            files[match.group("cls")] = path
    if not files:
        raise ListsError(f"{root}: no <class>_test_split{split}.txt files")
    classes = sorted(files)
    entries, unused = [], 0
    for label, cls in enumerate(classes):
        for line_no, line in _read_lines(files[cls]):
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ListsError(f"{files[cls]}, line {line_no}: expected '<video>.avi 0|1|2', got {line!r}")
            if fields[1] == "0":
                unused += 1
                continue
            entries.append(Entry(part="train" if fields[1] == "1" else "test", ref=f"{cls}/{fields[0]}",
                                 label=label))
    return Lists("hmdb51", classes, entries, ["train", "test"],
                 {"train": (f"trainlist{split:02d}_nframe.txt", f"trainlist{split:02d}.txt"),
                  "test": (f"testlist{split:02d}_nframe.txt", f"testlist{split:02d}.txt")},
                 reference_strip_ext=True, notes=[f"{unused} videos marked 0 (unused in split {split})"])


# --------------------------------------------------------------------------- Kinetics-400

def kinetics_file_name(youtube_id: str, start, end) -> str:
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}.mp4"


def kinetics400_entries(annotations) -> Lists:
    root = Path(annotations)
    csv_files = sorted(root.glob("*.csv")) if root.is_dir() else [root]
    if not csv_files:
        raise ListsError(f"{root}: no .csv files")
    rows, unlabelled = [], 0
    for path in csv_files:
        # bounded like the other annotation files; csv.Error: a field over csv's limit, a NUL in older Pythons
        reader = csv.reader(io.StringIO(_read_text(path), newline=""))
        try:
            header = [name.strip() for name in next(reader, [])]
            needed = {"youtube_id", "time_start", "time_end", "split"}
            if not needed <= set(header):
                raise ListsError(f"{path}: expected the header label,youtube_id,time_start,time_end,split; "
                                 f"got {','.join(header)[:80]!r}")
            for fields in reader:
                if not fields:
                    continue
                line_no = reader.line_num
                if len(fields) < len(header):   # an unclosed quote swallows the rest of the file into one field
                    raise ListsError(f"{path}, line {line_no}: expected {len(header)} fields ({','.join(header)}), "
                                     f"got {len(fields)}")
                row = dict(zip(header, fields))
                if any(c in "\n\r\t" for key in ("label", "youtube_id", "split") for c in row.get(key, "")):
                    raise ListsError(f"{path}, line {line_no}: a line break or TAB inside a field "
                                     "(it would break the lists' lines)")
                label = row.get("label", "").strip()
                if not label:
                    unlabelled += 1
                    continue
                try:
                    name = kinetics_file_name(row["youtube_id"].strip(), row["time_start"], row["time_end"])
                except (TypeError, ValueError):
                    raise ListsError(f"{path}, line {line_no}: bad time_start/time_end "
                                     f"{row['time_start']!r}/{row['time_end']!r}") from None
                rows.append((row["split"].strip() or "unknown", label, name))
        except csv.Error as err:
            raise ListsError(f"{path}, line {reader.line_num}: not a CSV file ({err})") from None
    classes = sorted({label for _, label, _ in rows})
    label_of = {name: i for i, name in enumerate(classes)}
    parts = list(dict.fromkeys(split for split, _, _ in rows))
    entries = [Entry(part=split, ref=f"{split}/{label}/{name}", label=label_of[label]) for split, label, name in rows]
    notes = [f"{unlabelled} rows without a label skipped (test split)"] if unlabelled else []
    return Lists("kinetics400", classes, entries, parts,
                 {p: (f"{p}_list_label_nframe.txt", f"{p}_list_label.txt") for p in parts},
                 reference_sep="  ", notes=notes)


# --------------------------------------------------------------------------- finding the videos

class VideoFinder:
    """Finds an annotated path under the videos folder: as written, case-insensitively
    (UCF's HandStandPushups / HandstandPushups), with spaces and underscores swapped in
    folder names (Kinetics labels), or (Kinetics) by file name anywhere."""

    def __init__(self, videos_dir, by_name: bool = False):
        self.root = Path(videos_dir)
        self.all = find_videos(self.root)
        self.lower = {}
        for rel in self.all:
            self.lower.setdefault(rel.lower(), rel)
        self.by_name = {}
        if by_name:
            for rel in self.all:
                self.by_name.setdefault(PurePosixPath(rel).name, rel)

    def find(self, ref: str) -> str | None:
        candidates = [ref]
        parts = ref.split("/")
        if len(parts) >= 2:
            folders = "/".join(parts[:-1])
            for a, b in ((" ", "_"), ("_", " ")):
                candidates.append(folders.replace(a, b) + "/" + parts[-1])
        if len(parts) >= 3:  # Kinetics: also <label>/<file> without the split folder
            candidates += [c.split("/", 1)[1] for c in list(candidates)]
        for candidate in candidates:
            if outside_problem(candidate):   # 'train//abs/x' loses its first folder: '/abs/x'
                continue
            if (self.root / candidate).is_file():
                return candidate
            found = self.lower.get(candidate.lower())
            if found is not None:
                return found
        return self.by_name.get(parts[-1])


# --------------------------------------------------------------------------- frame counts

def frame_count(path: Path, exact: bool = False) -> tuple[int | None, str]:
    """(frames, "") or (None, reason). Header nb_frames unless exact or the header has none."""
    path = path.absolute()
    if path.stat().st_size == 0:
        return None, "empty file (0 bytes)"
    base = [executable("ffprobe"), "-v", "error", "-select_streams", "v:0"]
    attempts = [] if exact else [base + ["-show_entries", "stream=nb_frames", "-of", "json", str(path)]]
    attempts.append(base + ["-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)])
    reason = "no video stream"
    for args in attempts:
        try:
            proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=FRAME_COUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"ffprobe took over {FRAME_COUNT_TIMEOUT_S} s"
        if proc.returncode != 0:
            return None, f"ffprobe cannot read it ({summarize_stderr(proc.stderr, path) or 'no message'})"
        try:
            streams = json.loads(proc.stdout).get("streams") or []
        except ValueError:
            return None, "ffprobe printed unparsable output"
        if not streams:
            return None, "no video stream"
        value = streams[0].get("nb_frames", streams[0].get("nb_read_frames"))
        try:
            frames = int(value)
        except (TypeError, ValueError):
            continue  # the header does not say: count
        if frames > 0:
            return frames, ""
        reason = "no frames"
    return None, reason


# --------------------------------------------------------------------------- the command

def load_annotations(dataset: str, annotations, split: int = 1) -> Lists:
    if dataset == "ucf101":
        return ucf101_entries(annotations, split)
    if dataset == "hmdb51":
        return hmdb51_entries(annotations, split)
    if dataset == "kinetics400":
        return kinetics400_entries(annotations)
    raise ListsError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def make_lists(dataset: str, annotations, videos_dir, out_dir, split: int = 1, frame_counts: bool = True,
               exact_counts: bool = False, workers: int = 4, progress: bool = False) -> dict:
    """Write the lists (see the module docstring); returns a summary dict."""
    videos_dir, out = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise ListsError(f"videos folder not found: {videos_dir}")
    lists = load_annotations(dataset, annotations, split)
    finder = VideoFinder(videos_dir, by_name=dataset == "kinetics400")
    missing = []
    for entry in lists.entries:
        problem = outside_problem(entry.ref)   # never looked for, never read
        entry.source = None if problem else finder.find(entry.ref)
        if entry.source is None:
            missing.append((entry, problem or "not found under --videos"))

    found = [e for e in lists.entries if e.source is not None]
    if frame_counts:
        def count(entry: Entry):
            return frame_count(videos_dir / entry.source, exact=exact_counts)
        with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:  # each job is an ffprobe subprocess
            iterator = pool.map(count, found)
            if progress:
                from tqdm import tqdm
                iterator = tqdm(iterator, total=len(found), unit="video", desc="frame counts", dynamic_ncols=True)
            for entry, (frames, reason) in zip(found, list(iterator)):
                entry.frames = frames
                if frames is None:
                    missing.append((entry, reason))
        found = [e for e in found if e.frames is not None]

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    _write(out / "classes.txt", [name for name in lists.classes])
    for part in lists.parts:
        mine = [e for e in found if e.part == part]
        ours_name = f"{part}.txt"
        _write(out / ours_name, [_our_line(e) for e in mine])
        ref_name = lists.reference_names[part][0 if frame_counts else 1]
        _write(out / ref_name, [_reference_line(e, lists, frame_counts) for e in mine])
        written[part] = dict(videos=len(mine), ours=ours_name, reference=ref_name)
    _write(out / "missing.txt", [f"{e.ref}\t{reason}" for e, reason in missing])
    return dict(dataset=dataset, classes=len(lists.classes), annotated=len(lists.entries), written=written,
                missing=[dict(file=e.ref, part=e.part, reason=r) for e, r in missing], notes=lists.notes,
                out=str(out))


def _our_line(entry: Entry) -> str:
    sep = "\t" if any(c.isspace() for c in entry.source) else " "
    return f"{entry.source}{sep}{entry.label}"


def _reference_line(entry: Entry, lists: Lists, with_frames: bool) -> str:
    path = entry.source
    if lists.reference_strip_ext:
        path = str(PurePosixPath(path).with_suffix(""))
    fields = [path, str(entry.label)] + ([str(entry.frames)] if with_frames else [])
    return lists.reference_sep.join(fields)


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["DATASETS", "ListsError", "make_lists", "load_annotations", "kinetics_file_name", "frame_count"]
