"""The one place where the data side meets the learning side: an iterable of
batches (dicts of torch tensors on the training device) built on a DALI pipeline.

    loader = PretrainLoader(path, plan_cfg, settings, device="gpu", local_rank=0, ...)
    # path: an LMDB of JPEG frames, or a video index (.json, `preprocessing index-videos`)
    for epoch in range(loader.start_epoch, epochs):
        for batch in loader:          # one epoch; batch["view1"]: (B, 3, T, S, S) float in [-1, 1]
            ...

Build it before `torch.distributed.init_process_group` when DALI workers are
forked (docs/architecture.md#forked-workers): forked workers must not inherit the process
group's sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from .faults import RecoverablePipeline, blocked_videos
from .frames_graph import (FRAMES_OUTPUTS, PretrainFramesSource, check_graph, cstp_pretrain_frames_pipeline,
                           frames_to_views)
from .lmdb_store import read_metadata
from .plan import PlanConfig
from .pretrain_pipeline import PRETRAIN_OUTPUTS, check_decode, cstp_pretrain_pipeline, cstp_pretrain_video_pipeline
from .sharding import samples_per_rank
from .sources import PretrainLmdbSource
from .video_source import PretrainVideoSource, is_video_index, read_video_index, refuse_undecodable


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int = 16
    num_threads: int = 2          # DALI CPU threads per pipeline
    workers: int = 0              # parallel external_source worker processes; 0 = in the pipeline thread
    start_method: str = "fork"
    prefetch: int = 2             # pipeline prefetch queue depth
    shuffle: bool = True
    seed: int = 1
    decode: str = "roi"           # LMDB path: "roi" | "full" (pretrain_pipeline.DECODE_MODES); videos ignore it
    graph: str = "views"          # LMDB path: "views" (2·T decoders) | "frames" (one; frames_graph.py)


class PretrainLoader:
    def __init__(self, db_path: str, plan_cfg: PlanConfig, settings: LoaderSettings, *,
                 device: str = "cpu", local_rank: int = 0, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, start_sample: int = 0, list_path: str | None = None,
                 blocklist: str | None = None):
        # list_path: a reference-format list (pipelines/reference_lmdb.py) through which a
        # reference-project LMDB is read: its videos, in its order, with its labels.
        # blocklist: videos not to read (data.blocklist, faults.py): each is replaced.
        videos = is_video_index(db_path)
        if videos and list_path:
            raise ValueError("a list file selects videos of an LMDB; a video index lists its videos itself")
        if videos:
            self.metas, self.classes, files = read_video_index(db_path)
            refuse_undecodable(self.metas, files, device)
        else:
            self.metas, self.classes = read_metadata(db_path, list_path)
            files = None
        if not self.metas:
            raise ValueError(f"{db_path} holds no videos")
        self.batch_size = settings.batch_size
        self.samples_per_rank = samples_per_rank(len(self.metas), world_size, settings.batch_size)
        self.steps_per_epoch = self.samples_per_rank // settings.batch_size
        self.start_epoch = start_epoch
        self.device = device
        common = dict(seed=settings.seed, batch_size=settings.batch_size, rank=rank, world_size=world_size,
                      shuffle=settings.shuffle, start_epoch=start_epoch, start_sample=start_sample)
        parallel = settings.workers > 0
        extra = dict(py_num_workers=settings.workers, py_start_method=settings.start_method) if parallel else {}
        if videos:
            self.source = PretrainVideoSource(db_path, self.metas, files, plan_cfg, **common)
            make_pipeline = cstp_pretrain_video_pipeline
        else:
            self.source = PretrainLmdbSource(db_path, self.metas, plan_cfg, **common)
            make_pipeline = cstp_pretrain_pipeline
            extra["decode"] = check_decode(settings.decode)
        self.source.blocked = blocked_videos(blocklist, self.metas, files)
        # the frames graph (LMDB only): batches of B·2·T frames, turned back into views in __iter__;
        # a fault is located with the views graph (same decoder and boxes per frame, one sample at a time)
        self.frames_per_view = plan_cfg.frames if check_graph(settings.graph) == "frames" and not videos else 0
        graph = dict(make_pipeline=make_pipeline, graph_source=None, batch_size=settings.batch_size,
                     outputs=PRETRAIN_OUTPUTS)
        if self.frames_per_view:
            graph = dict(make_pipeline=cstp_pretrain_frames_pipeline, graph_source=PretrainFramesSource,
                         batch_size=settings.batch_size * 2 * plan_cfg.frames, outputs=FRAMES_OUTPUTS)
        # Workers start now, the pipeline builds at the first batch; rebuilt from the failed
        # batch when a sample does not decode (faults.py).
        self._dali = RecoverablePipeline(
            self.source, graph["make_pipeline"],
            dict(device=device, parallel=parallel, batch_size=graph["batch_size"], num_threads=settings.num_threads,
                 device_id=local_rank if device == "gpu" else None, prefetch_queue_depth=settings.prefetch,
                 **extra),
            graph["outputs"], device=device, local_rank=local_rank, graph_source=graph["graph_source"],
            samples_per_batch=settings.batch_size, make_probe=make_pipeline)
        self._epoch, self._start_sample = start_epoch, start_sample
        self._first_epoch_steps = self.steps_per_epoch - start_sample // settings.batch_size

    @property
    def build_seconds(self) -> float | None:
        """Seconds the DALI pipeline took to build (at the first batch); None until then."""
        return self._dali.build_seconds

    def steps_in_epoch(self, epoch: int) -> int:
        return self._first_epoch_steps if epoch == self.start_epoch else self.steps_per_epoch

    @property
    def pipeline(self):
        return self._dali.pipeline

    def __iter__(self):
        """One epoch of batches."""
        epoch, self._epoch = self._epoch, self._epoch + 1
        first = self._start_sample if epoch == self.start_epoch else 0
        for outputs in self._dali.epoch(epoch, first):
            batch = outputs[0]
            if self.frames_per_view:
                batch = frames_to_views(batch, self.frames_per_view)
            for name in PRETRAIN_OUTPUTS[2:]:
                batch[name] = batch[name].long()
            yield batch

    def close(self):
        # Dropping the iterator frees the pipeline and its worker processes.
        self._dali.close()
