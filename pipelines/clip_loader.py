"""The loader of supervised clips (finetuning, validation, testing): an iterable of
batches (dicts of torch tensors on the loader's device), one epoch per iteration.

    settings = ClipLoaderSettings(batch_size=8, num_threads=2, workers=0, prefetch=2, seed=1)
    loader = ClipLoader(path, "train", ClipPlanConfig(), settings, device="gpu", local_rank=0,
                        rank=0, world_size=1, start_epoch=0, start_sample=0, videos=None, list_path=None)
    # path: an LMDB of JPEG frames, or a video index (.json, `preprocessing index-videos`)
    # list_path: a reference-format list file (pipelines/reference_lmdb.py) through which
    #   a reference-project LMDB is read: the list's videos, in its order, with its labels
    for epoch in range(loader.start_epoch, epochs):
        for batch in loader:
            batch["clip"]         # float32 (B, 3, T, S, S) in [-1, 1]
            batch["label"]        # int64 (B,)
            batch["video_index"]  # int64 (B,), index into loader.metas
            batch["clip_index"]   # int64 (B,), which test clip of the video (0 in train/val)
            batch["crop_index"]   # int64 (B,), which spatial crop of that clip (0 in train/val and
                                  #   with clip_cfg.spatial_crops = 1)
            batch["valid"]        # bool (B,): False for padding (val/test) and val/test replacements
            batch["substituted"]  # int64 (B,): 1 where an unreadable video was replaced

train: every rank reads the same number of clips, a multiple of the batch (the
remainder is dropped, and changes every epoch). val/test: every item exactly once
with valid = True over all ranks; see clip_source.py. `videos` restricts the loader
to a subset of the database's videos (a validation split carved out of the training
LMDB); video_index still indexes the full `metas`.

executor="reference" runs the same plans with numpy/PIL in a torch DataLoader
(clip_reference.py): the tests' oracle and the benchmark's baseline. Build a DALI
loader before `torch.distributed.init_process_group` when workers are forked
(docs/architecture.md#forked-workers).
"""

from __future__ import annotations

from dataclasses import dataclass

from .clip_plan import ClipPlanConfig
from .clip_source import CLIP_OUTPUTS, ClipLmdbSource, ClipVideoSource
from .faults import RecoverablePipeline, blocked_videos
from .lmdb_store import read_metadata
from .video_source import is_video_index, read_video_index, refuse_undecodable

EXECUTORS = ("dali", "reference")


@dataclass(frozen=True)
class ClipLoaderSettings:
    batch_size: int = 8
    num_threads: int = 2          # DALI CPU threads per pipeline
    workers: int = 0              # external_source worker processes (DALI) or DataLoader workers (reference)
    start_method: str = "fork"
    prefetch: int = 2             # pipeline prefetch queue depth (DataLoader prefetch_factor)
    shuffle: bool = True          # train only; val/test are always in video order
    seed: int = 1


class ClipLoader:
    def __init__(self, path: str, mode: str, clip_cfg: ClipPlanConfig, settings: ClipLoaderSettings, *,
                 device: str = "cpu", local_rank: int = 0, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, start_sample: int = 0, videos=None, executor: str = "dali",
                 list_path: str | None = None, blocklist: str | None = None):
        # blocklist: videos not to read (data.blocklist, faults.py): each is replaced.
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        path = str(path)
        from_videos = is_video_index(path)
        if from_videos and list_path:
            raise ValueError(f"{path}: a list file selects videos of an LMDB; a video index lists its videos "
                             "itself (drop the list, or point at the LMDB)")
        if from_videos:
            self.metas, self.classes, files = read_video_index(path)
            if executor == "reference":
                raise ValueError(f"{path}: the reference executor reads LMDBs only; use executor='dali' for "
                                 "video files, or build an LMDB with `python -m preprocessing build-lmdb`")
            refuse_undecodable(self.metas if videos is None else [self.metas[v] for v in videos],
                               files if videos is None else [files[v] for v in videos], device)
        else:
            # With a list: metas[i].key is the LMDB entry of video i (the source reads it there).
            self.metas, self.classes = read_metadata(path, str(list_path) if list_path else None)
            files = None
        if not self.metas:
            raise ValueError(f"{path} holds no videos")
        unlabelled = [m.name for m in self.metas if m.label < 0]
        if unlabelled:   # a CrossEntropy IndexError ('Target -1') or a retrieval RuntimeError otherwise
            raise ValueError(f"{path}: {len(unlabelled)} of its {len(self.metas)} videos have no label (e.g. "
                             f"{unlabelled[0]!r}, not under a class folder); read a reference LMDB through its "
                             "list file (data.train_list, evaluate.py --list / --train-list)")
        # labels may run past the class names (a list whose labels do not follow the folders)
        self.num_classes = max(len(self.classes), max(m.label for m in self.metas) + 1)
        self.mode = mode
        self.batch_size = settings.batch_size
        self.start_epoch = start_epoch
        self.start_sample = start_sample
        self.device = device
        self.executor = executor
        common = dict(seed=settings.seed, batch_size=settings.batch_size, rank=rank, world_size=world_size,
                      shuffle=settings.shuffle and mode == "train", start_epoch=start_epoch,
                      start_sample=start_sample, videos=videos)
        if from_videos:
            self.source = ClipVideoSource(path, self.metas, files, clip_cfg, mode, **common)
        else:
            self.source = ClipLmdbSource(path, self.metas, clip_cfg, mode, **common)
        self.source.blocked = blocked_videos(blocklist, self.metas, files)
        self.samples_per_rank = self.source.per_rank
        self.steps_per_epoch = self.samples_per_rank // settings.batch_size
        self._epoch = start_epoch
        if executor == "reference":
            import torch

            from .clip_reference import ReferenceClipBatches
            target = torch.device(f"cuda:{local_rank}") if device == "gpu" else None
            self._dali = None
            self._reference = ReferenceClipBatches(self.source, batch_size=settings.batch_size,
                                                   workers=settings.workers, prefetch=settings.prefetch,
                                                   target=target)
        else:
            self._reference = None
            self._build_dali(settings, from_videos, local_rank)

    def _build_dali(self, settings: ClipLoaderSettings, from_videos: bool, local_rank: int):
        # Imported here so that plans and the reference executor work without DALI.
        from .clip_pipeline import clip_lmdb_pipeline, clip_video_pipeline

        parallel = settings.workers > 0
        extra = dict(py_num_workers=settings.workers, py_start_method=settings.start_method) if parallel else {}
        make_pipeline = clip_video_pipeline if from_videos else clip_lmdb_pipeline
        # Workers start now, the pipeline builds at the first batch; rebuilt from the failed
        # batch when a sample does not decode (faults.py).
        self._dali = RecoverablePipeline(
            self.source, make_pipeline,
            dict(device=self.device, parallel=parallel, batch_size=settings.batch_size,
                 num_threads=settings.num_threads, device_id=local_rank if self.device == "gpu" else None,
                 prefetch_queue_depth=settings.prefetch, **extra),
            CLIP_OUTPUTS, device=self.device, local_rank=local_rank)

    @property
    def pipeline(self):
        return self._dali.pipeline if self._dali is not None else None

    @property
    def build_seconds(self) -> float | None:
        """Seconds the DALI pipeline took to build (at the first batch); None until then."""
        return self._dali.build_seconds if self._dali is not None else None

    @property
    def num_items(self) -> int:
        """val/test: the distinct items over all ranks (each read once with valid = True)."""
        return self.source.num_items

    def steps_in_epoch(self, epoch: int) -> int:
        skipped = self.start_sample // self.batch_size if epoch == self.start_epoch else 0
        return self.steps_per_epoch - skipped

    def __iter__(self):
        """One epoch of batches."""
        epoch = self._epoch
        self._epoch += 1
        if self.steps_in_epoch(epoch) == 0:
            return  # resumed after the last step of start_epoch: its sources start at the next one
        if self._reference is not None:
            first = self.source.start_sample if epoch == self.source.start_epoch else 0
            yield from self._reference.epoch(epoch, first)
            return
        first = self.start_sample if epoch == self.start_epoch else 0
        for outputs in self._dali.epoch(epoch, first):
            batch = outputs[0]
            for name in CLIP_OUTPUTS[1:]:
                batch[name] = batch[name].bool() if name == "valid" else batch[name].long()
            yield batch

    def close(self):
        # Dropping the iterator frees the pipeline and its worker processes.
        if self._dali is not None:
            self._dali.close()
        self._reference = None
