"""What every per-sample `external_source` callable shares, whatever it plans (CSTP
pretraining pairs, supervised clips) and whatever it reads (LMDB frames, video
files): where a DALI SampleInfo sits in this rank's epochs, restartable at any
(start_epoch, start_sample); this rank's shuffled share of an epoch; the reader of
the database; the guard of a DALI worker process; the attempt loop that replaces
unreadable, blocklisted and undecodable samples deterministically; one warning per
bad video.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

import numpy as np

from .faults import BrokenDataError, DecodeFailedError, SubstitutesUndecodable
from .lmdb_store import LmdbFrameReader, VideoMeta, lmdb_keys
from .sharding import shard_indices

log = logging.getLogger("pipelines.sources")   # the warnings keep the logger name they always had

# A sample whose video cannot be read is replaced by another, chosen deterministically;
# this many bad videos in a row means the database itself is broken.
MAX_SUBSTITUTIONS = 16


class BadSampleError(RuntimeError):
    """A video whose planned frames cannot be read or would break the decoder."""


def _guard_worker_process():
    """In a DALI worker process: die with the parent rank and leave SIGTERM/SIGINT to
    it (docs/architecture.md#signals-and-orphans): otherwise a SIGKILLed rank leaves
    orphans that hold its sockets, and a preempted rank loses its workers before it can save."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochSampleSource(SubstitutesUndecodable):
    """Base of the sample sources: (epoch, position) bookkeeping, the reader, and the
    attempt loop (`first_readable`) with blocklist and decoder-failure marks
    (faults.SubstitutesUndecodable).

    db_path: the LMDB (or, for the video sources, the video index, which the reader
    then never opens); metas: the videos, in dataset order."""

    def __init__(self, db_path: str, metas: list[VideoMeta], *, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, start_epoch: int = 0, start_sample: int = 0):
        if start_sample % batch_size:
            raise ValueError(f"start_sample {start_sample} must be a multiple of the batch size {batch_size}")
        # Videos of a reference LMDB read through a list file sit at other entry ids
        # (VideoMeta.key): video i reads entry metas[i].key.
        self.reader = LmdbFrameReader(db_path, lmdb_keys(metas))
        self.path = db_path
        self.metas = metas
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start_epoch = start_epoch
        self.start_sample = start_sample
        self._guarded_pid = os.getpid()
        self._order_epoch = None
        self._order = None
        self._reported: set[int] = set()

    def __call__(self, sample_info):
        """DALI's per-sample call: the outputs of this rank's sample at sample_info's
        position (subclasses give per_rank, sample() and outputs())."""
        self._guard_if_worker()
        epoch, position = self.position(sample_info)
        if position >= self.per_rank:
            raise StopIteration
        return self.sample_outputs(epoch, position)

    def sample_outputs(self, epoch: int, position: int) -> tuple:
        return self.outputs(*self.sample(epoch, position))

    def position(self, sample_info) -> tuple[int, int]:
        """(epoch, index within this rank's epoch) of a DALI SampleInfo."""
        epoch = sample_info.epoch_idx + self.start_epoch
        offset = self.start_sample if sample_info.epoch_idx == 0 else 0
        return epoch, sample_info.idx_in_epoch + offset

    def epoch_order(self, epoch: int, count: int) -> np.ndarray:
        """This rank's positions into `count` items for `epoch` (sharding.shard_indices),
        computed once per epoch."""
        if self._order_epoch != epoch:
            self._order = shard_indices(count, self.rank, self.world_size, self.batch_size, self.seed, epoch,
                                        self.shuffle)
            self._order_epoch = epoch
        return self._order

    # What the attempt loop replaces: an unreadable video (BadSampleError), or one that
    # is blocklisted or failed in the decoder at this attempt (DecodeFailedError).
    SUBSTITUTED_ERRORS: tuple = (BadSampleError, DecodeFailedError)

    def first_readable(self, epoch: int, position: int, item: tuple, read):
        """(read(*item), attempt) for the sample at `position` of `epoch`: `item` (its
        video first) or, when that fails with SUBSTITUTED_ERRORS, the item
        `self.replacement(epoch, position, attempt)` chooses instead, and so on
        (attempt > 0: a substitute). Deterministic, so that a resumed or repeated run
        makes the same choices; remembers the attempt and video in last_attempt and
        last_video (what faults.PipelineRecovery marks)."""
        for attempt in range(MAX_SUBSTITUTIONS):
            video = item[0]
            try:
                self.check_not_failed(epoch, position, attempt, video)
                if self.metas[video].problem:   # a placeholder (read_metadata): never read
                    raise BadSampleError(self.metas[video].problem)
                result = read(*item)
            except self.SUBSTITUTED_ERRORS as err:
                self._report_once(video, err)
                item = self.replacement(epoch, position, attempt)
                continue
            self.last_attempt, self.last_video = attempt, video
            return result, attempt
        raise BrokenDataError(f"{MAX_SUBSTITUTIONS} {BrokenDataError.MARK} in {self.path} (the database looks "
                              "broken: rebuild it with `python -m preprocessing build-lmdb`)")

    def replacement(self, epoch: int, position: int, attempt: int) -> tuple:
        """The item read instead after `attempt` failed at `position` of `epoch`."""
        raise NotImplementedError

    def _guard_if_worker(self):
        if os.getpid() != self._guarded_pid:
            _guard_worker_process()
            self._guarded_pid = os.getpid()

    def _report_once(self, video: int, err: Exception):
        if video not in self._reported:
            self._reported.add(video)
            log.warning("skipping video %d (%s) of %s: %s; another sample takes its place", video,
                        self.metas[video].name, self.path, err)
