"""What the commands of `python -m preprocessing` share on the command line: argument
types with one-line messages, the sub-command factory, the --videos/--list check and
byte sizes for people. Used by preprocessing/__main__.py and preprocessing/tools_cli.py;
evaluate.py and benchmark.py (bench/settings.py) take int_at_least from here too."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

PROG = "python -m preprocessing"


def checked(kind: Callable, ok: Callable[[object], bool], requirement: str) -> Callable[[str], object]:
    """An argparse type: `kind(text)` (int, float or another such type) that must pass
    `ok`, else the message "must be <requirement>, got <text>"."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "a non-negative integer")
at_least_two = checked(int, lambda v: v >= 2, "at least 2 (one test video per class)")
short_side = checked(int, lambda v: v >= 2, "at least 2 pixels")
even_short_side = checked(short_side, lambda v: v % 2 == 0, "even (4:2:0 video has even frame sizes)")
fps = checked(float, lambda v: 0 < v <= 1000, "a frame rate in (0, 1000]")
# the range per encoder is checked once the encoder is known
quality = checked(int, lambda v: 1 <= v <= 100, "1 to 100 (--encoder turbo) or 2 to 31 (--encoder ffmpeg)")
crf = checked(int, lambda v: 0 <= v <= 51, "0 (lossless) to 51 (worst)")
split = checked(positive_int, lambda v: v <= 3, "a split of UCF101 or HMDB51: 1, 2 or 3")


def add_command(commands, name: str, help_text: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A sub-command whose description and examples keep their line breaks."""
    return commands.add_parser(name, help=help_text, description=description, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def require_videos_and_list(args, parser) -> None:
    """Refuse (exit 2) a --videos that is not a folder or a --list that is not a file."""
    if not Path(args.videos).is_dir():
        parser.error(f"--videos {args.videos}: no such folder")
    if args.list is not None and not Path(args.list).is_file():
        parser.error(f"--list {args.list}: no such file")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
