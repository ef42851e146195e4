#!/usr/bin/env bash
# Every GPU check of CSTP-DALI in one run, for a lent GPU session (one H100/H200, DALI
# installed into /tmp/site as docs/gpu.md describes; lmdb and ffmpeg-python come
# with it). Frugal: planned for ~5 minutes on an H100 after the DALI install (not yet timed
# on one); past GPU_CHECK_BUDGET_S seconds (default 420) the remaining benchmark runs are
# skipped and the summary still comes. Real clips: carry a copy of ../shared/data/real-clips
# as data/real-clips (6 MB), or pass --clips DIR.
#
#   1. records the card (`nvidia-smi --query-gpu=name --format=csv`) and the versions;
#   2. data, both sources from the same videos: real clips (--clips DIR, else shared/data/
#      real-clips or data/real-clips in the copied tree) or, without them, `preprocessing demo-data`;
#      `preprocessing transcode` makes NVDEC-friendly H.264 copies (short side 256), then
#      `index-videos` indexes them (video-file path) and `build-lmdb` converts the same files
#      (LMDB path). Needs ffmpeg and ffprobe; without them benchmark.py makes synthetic data
#      (an LMDB; for videos one H.264 file, needing ffmpeg or the imageio-ffmpeg wheel).
#      --data DB / --videos INDEX.json use prepared data instead;
#   3. pytest -m gpu (tests/test_gpu.py: GPU vs CPU for the same plans, both data paths,
#      ClipLoader, devices of the batches);
#   4. starts `nvidia-smi dmon -s u` (SM, NVDEC, NVJPG utilisation) in the background;
#   5. benchmark.py --all on the LMDB at per-GPU batch 32 and 64, bf16 (DALI loader, PIL
#      reference loader with the same CPU cores, model, e2e); the video path's loader and
#      e2e at 32 and 64; the LMDB loader with --decode roi and --decode full; model mode fp32
#      and bf16 with and without channels-last (configs/ucf101.yaml: R(2+1)D-10 width 1.0,
#      16 frames, 112 px);
#   6. ends with a short table of every headline figure (benchmark.py gpu-check-summary):
#      compute-bound ratio e2e ÷ model for both sources and batches, loader speed-up DALI ÷
#      reference, roi vs full decode (which is faster), model fp32/bf16/channels-last,
#      NVDEC/NVJPG utilisation.
#
# Results go to $OUT (or --out DIR), 8 files at most (what the device tool brings back):
# gpu_check.log, summary.txt, results.json (every run's JSON, utilisation per run), gpu.csv,
# dmon.log, smi_query.csv, all_lmdb_b32.md, all_lmdb_b64.md.
#
#   bash scripts/gpu_check.sh                    # on the GPU machine, after the DALI install
#   bash scripts/gpu_check.sh --data data/rc.lmdb --videos data/rc_h264.json
#   bash scripts/gpu_check.sh --cpu-dry-run      # the same steps, tiny, on a CPU (tests this script)
#   bash scripts/gpu_check.sh --prepare data/gpu_check   # here, with ffmpeg: step 2 only, into a folder
#       # (~55 MB for the real clips) to carry to a GPU machine that has no ffmpeg; there:
#   bash scripts/gpu_check.sh --data data/gpu_check/h264.lmdb --videos data/gpu_check/h264.json
#
# Exit status: 0 all steps ran; 1 a step failed or was skipped (the others still ran);
# 2 bad arguments or a missing prerequisite (no GPU, no DALI).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 DATA="" VIDEOS="" CLIPS="" PREPARE="" OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --data) DATA="${2:?--data needs an LMDB path}"; shift ;;
    --videos) VIDEOS="${2:?--videos needs a video index (.json)}"; shift ;;
    --clips) CLIPS="${2:?--clips needs a folder}"; shift ;;
    --prepare) PREPARE="${2:?--prepare needs a folder}"; shift ;;
    --out) OUTDIR="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || OUTDIR=$(mktemp -d /tmp/gpu_check_out.XXXXXX)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
MONITORS=()
cleanup() {
  for pid in "${MONITORS[@]}"; do kill "$pid" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1

[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "$DRY" = 1 ]; then
  # Same steps, tiny: a 0.0625-wide model on 4-frame 32-px views, batches of 2 and 4.
  DEVICE=cpu BATCHES="2 4" STEPS=2 WARMUP=1 SHORT_SIDE=64 LIMIT=300 DECODE_STEPS=2 CLIP_LIST=2
  CFG=(--config configs/demo.yaml model.width=0.0625 proj_hidden=32 proj_dim=16 plan.frames=4 crop_size=32
       train.threads=1 --threads 1)
  WORKER_ARGS=(--workers 0)
else
  # 10 timed steps after 3 warm-up ones: each figure is an average over 320-640 samples.
  DEVICE=gpu BATCHES="32 64" STEPS=10 WARMUP=3 SHORT_SIDE=256 LIMIT=180 DECODE_STEPS=15 CLIP_LIST=0
  # bf16 explicitly (the GPU default too); DALI: the recipe's 4 threads and 4 workers; the
  # reference loader: one DataLoader worker per CPU core (benchmark.py's default), its best.
  CFG=(--config configs/ucf101.yaml --threads 4 --precision bf16)
  WORKER_ARGS=()
fi
FIRST_BATCH=${BATCHES%% *}
# Seconds after which the remaining benchmark runs are skipped (0 = none), so that the summary
# still comes inside the device call's limit; a run in flight at the budget finishes (LIMIT each).
BUDGET_S=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 0 || echo 420)}
FAILED=()
START=$(date +%s)
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), +$(( $(date +%s) - START )) s)"; }
run() {  # run CMD...: a step that may fail without stopping the others
  echo "+ $*"
  "$@"; local rc=$?
  [ $rc -eq 0 ] || { echo "!! exit $rc: $*"; FAILED+=("$*"); }
  return $rc
}
bench() {  # bench NAME ARGS...: one benchmark.py run, its JSON in $WORK/NAME.json, its time span in marks.txt
  local name=$1; shift
  if [ "$BUDGET_S" -gt 0 ] && [ $(( $(date +%s) - START )) -gt "$BUDGET_S" ]; then
    echo "!! skipped $name: past the time budget of $BUDGET_S s (GPU_CHECK_BUDGET_S)"; FAILED+=("$name (skipped)")
    return 1
  fi
  local t0; t0=$(date +%s.%N)
  # the run's own flags last: they win over CFG's (e.g. --precision fp32)
  run timeout "$LIMIT" "$PYTHON" benchmark.py "${CFG[@]}" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
      "$@" --json "$WORK/$name.json"
  local rc=$?
  echo "$name $t0 $(date +%s.%N)" >> "$WORK/marks.txt"
  return $rc
}

make_data() {  # make_data DIR: NVDEC-friendly H.264 copies of $CLIPS, their index and their LMDB in DIR
  local dir=$1 list_args=()
  mkdir -p "$dir"
  if [ -z "$CLIPS" ]; then
    for d in shared/data/real-clips ../shared/data/real-clips data/real-clips; do
      [ -d "$d" ] && { CLIPS=$d; break; }
    done
  fi
  if [ -z "$CLIPS" ]; then
    run "$PYTHON" -m preprocessing demo-data --out "$WORK/demo" --workers "$(nproc)" && CLIPS="$WORK/demo/videos"
  elif [ "$CLIP_LIST" -gt 0 ]; then  # dry run: two clips are enough
    (cd "$CLIPS" && ls | grep -E '\.(mp4|avi|mkv|webm)$' | head -n "$CLIP_LIST") > "$WORK/clips.txt"
    list_args=(--list "$WORK/clips.txt")
  fi
  [ -n "$CLIPS" ] || return 1
  # One set of files for both sources: NVDEC-friendly H.264, then index it and convert it.
  run "$PYTHON" -m preprocessing transcode --videos "$CLIPS" "${list_args[@]}" --out "$dir/h264" \
      --short-side "$SHORT_SIDE" --preset veryfast --workers "$(nproc)" --quiet &&
    run "$PYTHON" -m preprocessing index-videos --videos "$dir/h264" --out "$dir/h264.json" \
        --workers "$(nproc)" --quiet &&
    # the index names its folder relative to itself, so the folder can travel
    run "$PYTHON" -c 'import json, sys; p = sys.argv[1]; i = json.load(open(p)); i["root"] = "h264"
json.dump(i, open(p, "w"), indent=1)' "$dir/h264.json" && VIDEOS="$dir/h264.json"
  # libjpeg-turbo through simplejpeg when that package came along, else ffmpeg's encoder
  local encoder=turbo
  "$PYTHON" -c 'import simplejpeg' 2>/dev/null || encoder=ffmpeg
  [ -d "$dir/h264" ] && run "$PYTHON" -m preprocessing build-lmdb --videos "$dir/h264" --out "$dir/h264.lmdb" \
      --encoder "$encoder" --workers "$(nproc)" --quiet && DATA="$dir/h264.lmdb"
}

if [ -n "$PREPARE" ]; then
  step "prepare the data for a GPU machine (step 2 only) in $PREPARE"
  "$PYTHON" -m preprocessing.ffmpeg_tools >/dev/null 2>&1 || {   # on PATH or in the venv
    echo "gpu_check.sh: --prepare needs ffmpeg and ffprobe"; exit 2; }
  SHORT_SIDE=256 CLIP_LIST=0
  make_data "$PREPARE" || { echo "gpu_check.sh: preparing the data failed"; exit 1; }
  [ ${#FAILED[@]} -eq 0 ] || { echo "FAILED steps: ${FAILED[*]}"; exit 1; }
  du -sh "$PREPARE"
  echo "carry $PREPARE (git-ignored under data/), then on the GPU machine:"
  echo "  bash scripts/gpu_check.sh --data $DATA --videos $VIDEOS"
  exit 0
fi

step "machine"
date -u
HAVE_SMI=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAVE_SMI=1
  nvidia-smi --query-gpu=name --format=csv | tee "$OUTDIR/gpu.csv"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
  printf 'name\n(no nvidia-smi on this machine)\n' | tee "$OUTDIR/gpu.csv"
fi
echo "CPU cores: $(nproc)"
"$PYTHON" - <<'EOF' || { echo "gpu_check.sh: python cannot import what the project needs (see docs/gpu.md)"; exit 2; }
import platform
import torch, numpy, lmdb, msgpack, yaml, PIL
import nvidia.dali as dali
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"DALI {dali.__version__}, numpy {numpy.__version__}, lmdb {lmdb.__version__}, {platform.platform()}")
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA GPU visible; run with --cpu-dry-run to test the script on a CPU"; exit 2
fi

step "data"
[ -z "$DATA" ] || [ -e "$DATA" ] || { echo "gpu_check.sh: --data $DATA does not exist"; exit 2; }
[ -z "$VIDEOS" ] || [ -f "$VIDEOS" ] || { echo "gpu_check.sh: --videos $VIDEOS does not exist"; exit 2; }
HAVE_FF=0
"$PYTHON" -m preprocessing.ffmpeg_tools >/dev/null 2>&1 && HAVE_FF=1   # on PATH or in the venv
if [ -z "$DATA$VIDEOS" ] && [ "$HAVE_FF" = 1 ]; then
  make_data "$WORK/data"
elif [ -z "$DATA$VIDEOS" ]; then
  echo "no ffmpeg/ffprobe here: benchmark.py makes synthetic colour-coded data"
fi
LMDB_ARGS=() VIDEO_ARGS=(--source video)
if [ -n "$DATA" ]; then
  # Store each video often enough, once, for the largest batch's warm-up + timed steps to fit in
  # one epoch (an epoch end re-forks the reference loader's workers inside the timed steps);
  # every run then reads this copy as it is (--repeat 1) instead of writing its own.
  NEED_ALL=$(( (WARMUP + STEPS + 2) * ${BATCHES##* } ))
  NEED_DECODE=$(( (WARMUP + DECODE_STEPS + 2) * FIRST_BATCH ))
  run "$PYTHON" - "$DATA" "$WORK/repeated.lmdb" $(( NEED_ALL > NEED_DECODE ? NEED_ALL : NEED_DECODE )) <<'EOF' &&
import sys
from bench.data import db_bytes, write_repeated_db
from pipelines.lmdb_store import read_metadata
source, target, need = sys.argv[1], sys.argv[2], int(sys.argv[3])
videos = len(read_metadata(source)[0])
copies = max(1, -(-need // videos))
write_repeated_db(source, target, copies)
print(f"{source}: {videos} videos, stored {copies}x in {target} ({db_bytes(target) / 2**30:.2f} GiB)")
EOF
    LMDB_ARGS=(--data "$WORK/repeated.lmdb" --repeat 1
               --data-origin "LMDB $(basename "$DATA") (short side $SHORT_SIDE), each video stored several times")
  [ ${#LMDB_ARGS[@]} -gt 0 ] || LMDB_ARGS=(--data "$DATA")
fi
if [ -n "$VIDEOS" ]; then
  if [ "$DEVICE" = cpu ]; then
    # DALI decodes H.264 on the GPU only; the dry run tests the video steps on synthetic MJPEG
    echo "(dry run: the H.264 index $VIDEOS is for the GPU; the video steps use synthetic MJPEG)"
  else
    VIDEO_ARGS=(--data "$VIDEOS")
    [ -n "$DATA" ] && VIDEO_ARGS+=(--reference-data "$DATA")
  fi
fi
echo "LMDB: ${DATA:-synthetic}; videos: ${VIDEOS:-synthetic}"

step "pytest -m gpu"
timeout "$LIMIT" "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py > "$WORK/pytest_gpu.log" 2>&1
rc=$?
cat "$WORK/pytest_gpu.log"
case $rc in
  0) tail -n 1 "$WORK/pytest_gpu.log" > "$WORK/pytest_gpu.txt" ;;
  5) echo "no tests are marked gpu" > "$WORK/pytest_gpu.txt" ;;
  *) echo "FAILED (exit $rc): $(tail -n 1 "$WORK/pytest_gpu.log")" > "$WORK/pytest_gpu.txt"
     FAILED+=("pytest -m gpu") ;;
esac

step "utilisation monitors"
if [ "$HAVE_SMI" = 1 ]; then
  nvidia-smi dmon -s u -o DT -d 1 > "$OUTDIR/dmon.log" 2>&1 &
  MONITORS+=($!)
  FIELDS=timestamp,utilization.gpu
  for f in utilization.decoder utilization.jpeg; do
    nvidia-smi --query-gpu=$f --format=csv,noheader >/dev/null 2>&1 && FIELDS+=",$f"
  done
  echo "dmon (SM/NVDEC/NVJPG) -> dmon.log; --query-gpu=$FIELDS -> smi_query.csv"
  nvidia-smi --query-gpu="$FIELDS" --format=csv,nounits -lms 500 > "$OUTDIR/smi_query.csv" 2>&1 &
  MONITORS+=($!)
else
  echo "no nvidia-smi: no utilisation figures"
fi

# Most important first: batch 32 of both sources, the decode choice, then batch 64, then the
# model variants; past the time budget the rest is skipped and the summary still comes.
for b in $BATCHES; do
  step "batch $b, bf16: LMDB --all (DALI loader, PIL reference loader, model, e2e); video files (NVDEC): loader, e2e"
  bench "all_lmdb_b$b" --all --batch "$b" "${WORKER_ARGS[@]}" "${LMDB_ARGS[@]}" --report "$OUTDIR/all_lmdb_b$b.md"
  bench "video_loader_b$b" loader --batch "$b" "${WORKER_ARGS[@]}" "${VIDEO_ARGS[@]}"
  bench "video_e2e_b$b" e2e --batch "$b" "${WORKER_ARGS[@]}" "${VIDEO_ARGS[@]}"
  if [ "$b" = "$FIRST_BATCH" ]; then
    step "LMDB JPEG decode: roi vs full, loader mode, batch $b, $DECODE_STEPS steps"
    for mode in roi full; do
      STEPS=$DECODE_STEPS bench "decode_${mode}_b$b" loader --decode "$mode" --batch "$b" \
          "${WORKER_ARGS[@]}" "${LMDB_ARGS[@]}"
    done
  fi
done

step "model: fp32 / bf16 × channels-last, batch $FIRST_BATCH (bf16 without it: the --all run)"
bench model_fp32 model --batch "$FIRST_BATCH" --precision fp32
bench model_fp32_cl model --batch "$FIRST_BATCH" --precision fp32 --channels-last
bench model_bf16_cl model --batch "$FIRST_BATCH" --precision bf16 --channels-last

for pid in "${MONITORS[@]}"; do kill "$pid" 2>/dev/null; done
MONITORS=()
rm -f "$OUTDIR"/all_lmdb_b*.png   # the device tool brings back 8 files; the numbers are in the .md
[ ${#FAILED[@]} -eq 0 ] || echo "FAILED steps: ${FAILED[*]}"
echo "results in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
step "summary"
"$PYTHON" benchmark.py gpu-check-summary "$WORK" "$OUTDIR" || FAILED+=("summary")
[ ${#FAILED[@]} -eq 0 ] || exit 1
