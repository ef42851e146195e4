"""Fork a DALI pipeline's workers now, build the pipeline on first use.

DALI forks the workers of a parallel external_source and refuses to once CUDA is
initialised in the process; building a GPU pipeline initialises it. So a process with
two loaders (finetune.py's train and val, evaluate.py's test and gallery) must start
the workers of every pipeline before it builds any of them (DALI's
`Pipeline.start_py_workers`). The loaders do it by construction: workers start in the
constructor, the build waits for the first batch. The other half of the rule (resolve
the device through NVML) is gpu_guard's; docs/gpu.md has both.
"""

from __future__ import annotations

import time


class DeferredDaliIterator:
    """A DALIGenericIterator over one pipeline, made (and the pipeline built) on first
    use; the pipeline's Python workers are started at construction."""

    def __init__(self, pipeline, output_names):
        pipeline.start_py_workers()   # builds the Python graph; forks the workers, if any
        self.pipeline = pipeline
        self.output_names = list(output_names)
        self.build_seconds: float | None = None   # pipeline build + iterator set-up, once built
        self._iterator = None

    def build(self):
        """The iterator; builds the pipeline (on GPU: initialises CUDA) the first time."""
        if self._iterator is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            start = time.perf_counter()
            self._iterator = DALIGenericIterator([self.pipeline], self.output_names, auto_reset=False,
                                                 last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False)
            self.build_seconds = time.perf_counter() - start
        return self._iterator

    def __iter__(self):
        return iter(self.build())

    def reset(self):
        self.build().reset()
