"""Data faults: damaged data costs a substituted sample, never the run, and never
passes silently.

Three lines of defence:

- at open: an LMDB whose data file is shorter than the pages its meta page says are
  in use (a partial copy) and a video index whose files changed or vanished since
  indexing are refused with a message (check_lmdb_complete, check_video_files);
  reading past the end of a memory-mapped file would kill the process with SIGBUS;
- in the source: a file that changed since indexing, a blocklisted video
  (`data.blocklist`, the format `preprocessing verify --decode` and `validate`
  write) or a sample known to fail in the decoder is replaced deterministically
  (SubstitutesUndecodable; the sources count the replacement in `substituted`);
- at run time: when the decoder fails inside a DALI pipeline (nvJPEG, libjpeg-turbo,
  NVDEC, libavcodec, or a video that delivers fewer frames than its index says),
  PipelineRecovery finds the sample(s) by running the same graph on one sample at a
  time, marks them, rebuilds the pipeline and resumes at the batch that failed.

Why samples are keyed by (epoch, position in the rank's epoch, attempt) and not by
video: whether a sample decodes is a property of that sample's bytes, frames and
boxes alone, so the substitution decided after a failure is the one a resumed or
repeated run decides too, and batches stay reproducible (a run-wide "bad video" set
would depend on what the run happened to read before). The log still names each
video once.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time

log = logging.getLogger(__name__)


class DataFaultError(ValueError):
    """Data that must not be read at all: refused at open with a one-line message."""


class BrokenDataError(RuntimeError):
    """Too many unreadable videos in a row: the run stops, with this one-line message."""

    MARK = "unreadable videos in a row"

    @classmethod
    def from_pipeline(cls, err: BaseException) -> "BrokenDataError | None":
        """Our source's BrokenDataError as DALI re-raised it (its text inside DALI's), or None."""
        match = re.search(rf"(\d+ {cls.MARK} in .*?build-lmdb`\))", str(err))
        return cls(match.group(1)) if match else None


class DecodeFailedError(RuntimeError):
    """A sample the decoder failed on earlier in this run: the source replaces it."""


# ---------------------------------------------------------------- LMDB completeness

LMDB_MAGIC = 0xBEEFC0DE
# MDB_meta in a meta page of a 64-bit build: 16-byte page header, then magic (u32),
# version (u32), address (u64), mapsize (u64), two MDB_db records of 48 bytes (the
# first one's leading u32 holds the page size), last used page number (u64), txnid (u64).
_META_MAGIC, _META_PAGE_SIZE, _META_LAST_PAGE = 16, 40, 136
_META_BYTES = 152
_PAGE_SIZES = tuple(1 << k for k in range(9, 17))   # 512 B .. 64 KiB


def lmdb_data_file(path: str) -> str:
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def lmdb_needed_bytes(data_file: str) -> int | None:
    """Bytes the data file must have: (last used page + 1) x page size, from the newer
    of the two meta pages; None when the file is no LMDB we can read the meta of (lmdb
    itself then says what is wrong). Reads at most two small blocks."""
    metas = []
    with open(data_file, "rb") as f:
        first = f.read(_META_BYTES)
        if len(first) < _META_BYTES or struct.unpack_from("<I", first, _META_MAGIC)[0] != LMDB_MAGIC:
            return None
        page_size = struct.unpack_from("<I", first, _META_PAGE_SIZE)[0]
        if page_size not in _PAGE_SIZES:
            return None
        metas.append(first)
        f.seek(page_size)
        second = f.read(_META_BYTES)
        if len(second) == _META_BYTES and struct.unpack_from("<I", second, _META_MAGIC)[0] == LMDB_MAGIC:
            metas.append(second)
    last_page, _txnid = max((struct.unpack_from("<QQ", m, _META_LAST_PAGE) for m in metas),
                            key=lambda pair: pair[1])
    return (last_page + 1) * page_size


def check_lmdb_complete(path: str) -> None:
    """DataFaultError if the LMDB's data file is shorter than its used pages (a partial
    copy): reading such a database through its memory map dies of SIGBUS."""
    data_file = lmdb_data_file(path)
    try:
        size = os.path.getsize(data_file)
        needed = lmdb_needed_bytes(data_file)
    except OSError:
        return  # missing or unreadable: lmdb.open says so
    if needed is not None and size < needed:
        raise DataFaultError(
            f"{data_file} is {size} bytes but its database needs {needed} bytes (an incomplete copy?); "
            "copy it again in full")


def too_large(path, limit: int, what: str) -> str | None:
    """Why the file at `path` cannot be `what` ("a video index"), from its size alone, or
    None: a file read whole is bounded before it is read, so that one that is no such file
    is refused instead of filling the memory."""
    size = os.path.getsize(path)
    return f"{path} is {size} bytes, more than {what} can be ({limit})" if size > limit else None


# ---------------------------------------------------------------- video files vs their index

def file_stamp(path: str) -> dict:
    """What the index records of a file, to notice later changes."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stamp_problem(path: str, stamp: dict | None) -> str | None:
    """Why `path` no longer is the file that was indexed, or None (also when the index
    predates stamps)."""
    if not stamp:
        return None
    try:
        now = file_stamp(path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if now["size"] != stamp.get("size", now["size"]):
        return f"is {now['size']} bytes, {stamp['size']} when indexed"
    if now["mtime_ns"] != stamp.get("mtime_ns", now["mtime_ns"]):
        return "was modified after indexing"
    return None


def check_video_files(index_path: str, files: list[str], stamps: list[dict | None], shown: int = 5) -> None:
    """DataFaultError naming the files that vanished or changed since indexing."""
    bad = [(f, why) for f, s in zip(files, stamps) if (why := stamp_problem(f, s))]
    if not bad:
        return
    listed = "; ".join(f"{f} {why}" for f, why in bad[:shown])
    more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
    raise DataFaultError(
        f"{len(bad)} of the {len(files)} videos of {index_path} changed since indexing: {listed}{more}; "
        f"re-index them (python -m preprocessing index-videos --videos DIR --out {index_path})")


# ---------------------------------------------------------------- blocklists

def parse_blocklist(text: str) -> dict[str, str]:
    """{path or name: reason} from a blocklist: one video per line, `path<TAB>reason`
    (a line without a TAB is just a path); blank lines and '#' lines are ignored."""
    blocked: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry, _, reason = line.partition("\t")
        blocked[entry.strip().replace("\\", "/")] = " ".join(reason.split()) or "listed"
    return blocked


def read_blocklist_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return parse_blocklist(f.read())
    except (OSError, UnicodeDecodeError) as err:
        raise DataFaultError(f"cannot read the blocklist {path}: {err}") from None


def blocked_videos(blocklist_path: str | None, metas, files: list[str] | None = None) -> dict[int, str]:
    """{video id: reason} of the videos a blocklist names. LMDB videos (files None) match
    by source path (as build-lmdb's --blocklist), with or without its extension, or by
    name ("class/video"); indexed video files match by their path or any trailing part of
    it (the index's relative `file`, as `index-videos --verify` writes it)."""
    if not blocklist_path:
        return {}
    listed = read_blocklist_file(blocklist_path)
    blocked = {}
    for i, meta in enumerate(metas):
        if files is None:
            keys = [meta.source, os.path.splitext(meta.source)[0], meta.name]
        else:
            parts = files[i].replace("\\", "/").split("/")
            keys = ["/".join(parts[k:]) for k in range(len(parts))]
        reason = next((listed[key] for key in keys if key and key in listed), None)
        if reason is not None:
            blocked[i] = reason
    if listed and not blocked:
        log.warning("blocklist %s names none of the %d videos", blocklist_path, len(metas))
    if metas and len(blocked) == len(metas):
        raise DataFaultError(f"the blocklist {blocklist_path} names every one of the {len(metas)} videos: "
                             "nothing is left to read")
    return blocked


def write_blocklist(path, entries: list[tuple[str, str]]) -> None:
    """`path<TAB>reason` lines, written atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for entry, reason in entries:
            f.write(f"{entry}\t{' '.join(str(reason).split())}\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- substitution in the sources

class SubstitutesUndecodable:
    """Mixed into the sample sources: blocklisted samples and samples marked after a
    decoder failure raise DecodeFailedError in the attempt loop, which replaces them
    like any unreadable video (the replacement is a function of seed, epoch, position
    and attempt). Plain attributes, so a source pickled to DALI workers carries them."""

    decode_failures: dict = {}   # {(epoch, position, attempt): the decoder's message}
    blocked: dict = {}           # {video: reason} from data.blocklist
    last_attempt: int = 0        # the attempt and video the last sample came from
    last_video: int = -1

    def check_not_failed(self, epoch: int, position: int, attempt: int, video: int) -> None:
        if video in self.blocked:
            raise DecodeFailedError(f"in the blocklist ({self.blocked[video]})")
        reason = self.decode_failures.get((epoch, position, attempt))
        if reason is not None:
            raise DecodeFailedError(f"the decoder failed on it: {reason}")

    def mark_undecodable(self, epoch: int, position: int, attempt: int, reason: str) -> None:
        """The source logs the video (once) when it replaces it."""
        self.decode_failures = {**self.decode_failures, (epoch, position, attempt): reason}


# ---------------------------------------------------------------- recovery of a DALI pipeline

def first_error_line(err: BaseException) -> str:
    """The informative part of a DALI error (its text starts with the op's traceback):
    the operator and what it encountered."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    op = re.search(r"operator `(?:nvidia\.dali\.)?([\w.]+)`", text)
    what = next((lines[i + 1] for i, line in enumerate(lines) if line == "encountered:" and i + 1 < len(lines)),
                lines[-1] if lines else type(err).__name__)
    return ((op.group(1) + ": " if op else "") + what.rstrip(" :"))[:300]


def is_source_error(err: BaseException) -> bool:
    """An exception raised by our own source (e.g. too many bad videos in a row):
    not a decoder fault, it must end the run with its message."""
    text = str(err)
    return "operator `nvidia.dali.fn.external_source`" in text or "Exception traceback received from worker" in text


class _OneSample:
    """The source seen by a probe pipeline: the wrapped source's attributes, and one
    fixed sample's outputs whenever DALI asks."""

    def __init__(self, source):
        self.__dict__["_source"] = source
        self.__dict__["current"] = None

    def __getattr__(self, name):
        return getattr(self._source, name)

    def __call__(self, sample_info):
        return self.current


class PipelineRecovery:
    """Finds the samples a failed DALI pipeline could not decode and marks them in the
    source (`source.decode_failures`), so that a pipeline rebuilt from the batch that
    failed replaces them.

    `make_probe(source)` builds the loader's own graph at batch size 1 in the calling
    thread, fed by `source`: a sample fails in the probe exactly when it fails in the
    pipeline. Only samples from the failed batch on are probed: the first batch (and
    the rest of it) that holds a failing sample is where the pipeline stopped, unless
    the error came from a batch the pipeline had prefetched further ahead, which the
    window of `lookahead` batches covers. Costs ~one decode per probed sample plus
    a graph build per failure, and nothing at all on clean data."""

    def __init__(self, source, make_probe, batch_size: int, lookahead: int):
        self.source = source
        self.make_probe = make_probe
        self.batch_size = batch_size
        self.lookahead = lookahead
        self.recoveries = 0

    def locate(self, epoch: int, first_position: int, sample_outputs, err: BaseException) -> int:
        """Probe from `first_position`; mark every failing sample up to the end of the
        first batch that holds one. Returns how many were marked (0: the error is not
        a sample's, re-raise it)."""
        feed = _OneSample(self.source)
        probe = self._build(feed)
        marked = 0
        stop = min(self.source.per_rank, first_position + self.lookahead * self.batch_size)
        position = first_position
        while position < stop:
            outputs = sample_outputs(epoch, position)
            feed.__dict__["current"] = outputs
            try:
                probe.run()
            except RuntimeError as failure:
                if is_source_error(failure):
                    raise
                self.source.mark_undecodable(epoch, position, self.source.last_attempt,
                                             first_error_line(failure))
                marked += 1
                del probe
                probe = self._build(feed)
                if marked == 1:   # finish this batch, then rebuild from its start
                    stop = min(stop, (position // self.batch_size + 1) * self.batch_size)
                continue          # the same position again: its replacement must decode too
            position += 1
        del probe
        if marked:
            self.recoveries += 1
        return marked

    def _build(self, feed):
        probe = self.make_probe(feed)
        probe.build()
        return probe


def probe_kwargs(device: str, local_rank: int) -> dict:
    """Pipeline arguments of a probe: one sample, in the calling thread."""
    return dict(batch_size=1, num_threads=1, device_id=local_rank if device == "gpu" else None,
                prefetch_queue_depth=1, parallel=False, device=device)



def fork_refused(device: str) -> bool:
    """Whether DALI would refuse to fork Python workers now: it does once the CUDA driver
    is initialised in this process, which building a GPU pipeline does (and a model on
    a GPU, whatever the data device)."""
    from nvidia.dali import backend

    return device == "gpu" or backend.IsDriverInitialized()


class RecoverablePipeline:
    """A loader's DALI pipeline and iterator that survive decoder faults: `epoch()`
    yields one epoch of DALIGenericIterator outputs; when the pipeline fails, the
    failing samples are located and marked (PipelineRecovery), the pipeline is
    rebuilt to start at the batch that failed, and the epoch goes on. The number of
    batches per epoch never changes, so DDP ranks stay in step while one recovers
    (it only takes that rank a few seconds longer).

    Workers start at construction, the pipeline builds at the first batch: DALI
    refuses to fork workers once CUDA is initialised, and building a GPU pipeline
    initialises it, so a process with two loaders must start the workers of both
    before it builds either (docs/gpu.md). A rebuild after a fault comes after CUDA
    on a GPU, so its workers are spawned, not forked (fork_refused); they must also be
    new ones, as the marked samples live in the source they receive.

    `source` is the per-sample source (recovery probes and marks it, a rebuild moves
    its start); the pipeline reads `graph_source(source)` in batches of
    `pipeline_kwargs["batch_size"]`, which hold `samples_per_batch` samples (the frames
    graph: B samples as B·2·T frames); `make_probe` builds the per-sample graph the
    recovery runs one sample at a time (default `make_pipeline`)."""

    def __init__(self, source, make_pipeline, pipeline_kwargs: dict, output_names, *, device: str,
                 local_rank: int = 0, graph_source=None, samples_per_batch: int | None = None, make_probe=None):
        self.source = source
        self.make_pipeline = make_pipeline
        self.graph_source = graph_source or (lambda sample_source: sample_source)
        self.kwargs = pipeline_kwargs
        self.output_names = list(output_names)
        self.device = device
        self.batch_size = samples_per_batch or pipeline_kwargs["batch_size"]   # samples per batch
        probe_args = probe_kwargs(device, local_rank)
        probe_extra = {k: v for k, v in pipeline_kwargs.items()
                       if k not in probe_args and k not in ("py_num_workers", "py_start_method")}
        make_probe = make_probe or make_pipeline
        # Batches the pipeline may have run ahead of the consumer when it fails.
        lookahead = pipeline_kwargs.get("prefetch_queue_depth", 2) + 2
        self.recovery = PipelineRecovery(
            source, lambda feed: make_probe(source=feed, **probe_args, **probe_extra), self.batch_size, lookahead)
        self.build_seconds: float | None = None   # pipeline build + iterator set-up, once built
        self.iterator = None
        self.pipeline = self._new_pipeline(self.kwargs)

    def _new_pipeline(self, kwargs: dict):
        pipeline = self.make_pipeline(source=self.graph_source(self.source), **kwargs)
        pipeline.start_py_workers()   # builds the Python graph; starts the workers, if any
        return pipeline

    def _rebuild_kwargs(self) -> dict:
        kwargs = dict(self.kwargs)
        if kwargs.get("py_num_workers") and kwargs.get("py_start_method", "fork") == "fork" \
                and fork_refused(self.device):
            kwargs["py_start_method"] = "spawn"
        return kwargs

    def build(self):
        """The iterator; builds the pipeline (on GPU: initialises CUDA) when there is none."""
        if self.iterator is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            if self.pipeline is None:
                self.pipeline = self._new_pipeline(self._rebuild_kwargs())
            start = time.perf_counter()
            self.iterator = DALIGenericIterator([self.pipeline], self.output_names, auto_reset=False,
                                                last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False)
            if self.build_seconds is None:
                self.build_seconds = time.perf_counter() - start
        return self.iterator

    def epoch(self, epoch: int, first_position: int):
        consumed = 0
        while True:
            iterator = self.build()   # outside the try: a failed build is no sample's fault
            try:
                for outputs in iterator:
                    consumed += 1
                    yield outputs
                break
            except Exception as err:   # DALI re-raises a worker's error as a bare Exception
                if is_source_error(err):
                    raise BrokenDataError.from_pipeline(err) or err
                if not isinstance(err, RuntimeError):
                    raise
                position = first_position + consumed * self.batch_size
                self.close()
                log.warning("the data pipeline failed at sample %d of epoch %d (%s); locating the sample",
                            position, epoch, first_error_line(err))
                if not self.recovery.locate(epoch, position, self.source.sample_outputs, err):
                    raise
                # Rebuilt to start where it failed: the same sharding, plans and
                # replacements as ever, with the marked samples replaced.
                self.source.start_epoch, self.source.start_sample = epoch, position
        self.iterator.reset()

    def close(self):
        # Dropping the iterator and the pipeline frees the pipeline and its workers.
        self.iterator = None
        self.pipeline = None
