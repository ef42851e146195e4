#!/usr/bin/env bash
# Every GPU check of CSTP-DALI in one run that fits one lent GPU session (docs/gpu.md).
#
# A lent machine gives 15 minutes of device time in all, its start and the calls that carry
# DALI in parts (p1..pN, ~58 MB each; docs/gpu.md) included.
# So this script ends, summary included, within 6 minutes of wall time: every part runs
# under `timeout` computed from one global deadline (GPU_CHECK_DEADLINE_S, default 330 s
# after the start); a part that would start with less than MIN_PART_S (20 s) left is skipped,
# one still running at the deadline is killed, and the script jumps to the summary (at most
# 25 s more). Nothing large is written on the device: the data is prepared here and carried.
#
# Here (a CPU machine with ffmpeg), once:
#   bash scripts/gpu_check.sh --prepare data/gpu_check
#       real clips -> NVDEC-friendly H.264 at short side 128 (h264/, h264.json) and their
#       LMDB (h264.lmdb), plus the H.264 files of the NVDEC tests (video_pair/): ~10-20 MB,
#       refused above 24 MB. Carry data/gpu_check (and data/real-clips, 6 MB, for the
#       real-clip GPU test) with the SMALLEST DALI part: every call carries at most 64 MiB.
# Device calls:
#   call 1: bash .devwheels/p1/install-dali.sh; bash scripts/gpu_check.sh --probe
#       (--probe prints what the machine has for the video path: ffmpeg, ffprobe, libnvcuvid)
#   calls 2..N-1: the other DALI parts;
#   last call (carry the smallest part + data/gpu_check + data/real-clips, timeout_s 420):
#       bash .devwheels/pN/install-dali.sh && bash scripts/gpu_check.sh
#
# Timing plan on one H100 (estimates; nothing has been timed on a GPU yet), in order of value:
#   part                                              limit   expected
#   machine, versions, data check                        -     ~10 s
#   1 pytest -m gpu (GPU vs CPU, 4:2:0, forked workers, 150 s   60-100 s
#     two loaders per process, finetune/evaluate)
#   2 graph facts: LMDB views graph, LMDB frames graph,  40 s   15 s each
#     clip graph (decoder operators, threads per rank,
#     pipeline build time)
#   3 LMDB --all at batch 32 (DALI loader, PIL loader,   120 s   60-90 s
#     model, e2e; 4 processes)
#   3b LMDB loader on the frames graph, batch 32          45 s   20 s
#   4 video files (NVDEC) e2e, then loader, batch 32      45 s   25 s each
#   5 LMDB decode roi vs full, loader, batch 32           40 s   20 s each
#   6 model fp32 / fp32+channels-last / bf16+cl           30 s   15 s each
#   7 batch 64: LMDB --all, video loader and e2e         120 s   (after the deadline: skipped)
#   summary (benchmark.py gpu-check-summary + bench/gpu_data.py summary)   25 s   5 s
# Parts 5-7 are expected to be cut by the deadline on a first run; what ran is in the
# summary, what was skipped is listed and counts as a failure (exit 1), and so does a
# skipped GPU test (a GPU test that did not run proved nothing).
#
# Results go to $OUT (or --out DIR), 8 files at most (what the device tool brings back):
# gpu_check.log, summary.txt, results.json, gpu.csv, dmon.log, smi_query.csv,
# all_lmdb_b32.md, graph_facts.json.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine, after the DALI install
#   bash scripts/gpu_check.sh --data DB --videos INDEX.json   # other prepared data
#   bash scripts/gpu_check.sh --cpu-dry-run    # the same parts, tiny, on a CPU (tests this script)
#   bash scripts/gpu_check.sh --prepare data/gpu_check         # here: the data to carry
#   bash scripts/gpu_check.sh --probe          # ffmpeg / ffprobe / libnvcuvid on this machine
#
# Exit status: 0 every part ran and passed; 1 a part failed or was skipped (the others and the
# summary still ran); 2 bad arguments or a missing prerequisite (no GPU, no DALI).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 DATA="" VIDEOS="" PREPARE="" PROBE=0 OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --data) DATA="${2:?--data needs an LMDB path}"; shift ;;
    --videos) VIDEOS="${2:?--videos needs a video index (.json)}"; shift ;;
    --prepare) PREPARE="${2:?--prepare needs a folder}"; shift ;;
    --probe) PROBE=1 ;;
    --out) OUTDIR="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,52p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

probe_video_tools() {
  "$PYTHON" -m preprocessing.ffmpeg_tools   # ffmpeg / ffprobe: on PATH or in the venv
  local cuvid
  cuvid=$( (ldconfig -p 2>/dev/null | grep -o 'libnvcuvid\.so[.0-9]*' | sort -u | tr '\n' ' ') || true)
  if [ -n "$cuvid" ]; then echo "libnvcuvid (NVDEC): $cuvid"; else echo "libnvcuvid (NVDEC): absent"; fi
}
if [ "$PROBE" = 1 ]; then probe_video_tools; exit 0; fi

if [ -n "$PREPARE" ]; then
  "$PYTHON" -m preprocessing.ffmpeg_tools >/dev/null 2>&1 || {   # on PATH or in the venv
    echo "gpu_check.sh: --prepare needs ffmpeg and ffprobe" >&2; exit 2; }
  CLIPS=""
  for d in shared/data/real-clips ../shared/data/real-clips ../../shared/data/real-clips data/real-clips; do
    [ -d "$d" ] && { CLIPS=$d; break; }
  done
  [ -n "$CLIPS" ] || { echo "gpu_check.sh: --prepare needs the real clips (shared/data/real-clips)" >&2; exit 2; }
  mkdir -p "$PREPARE" || exit 2
  set -e
  "$PYTHON" -m preprocessing transcode --videos "$CLIPS" --out "$PREPARE/h264" --short-side 128 --preset veryfast \
      --workers "$(nproc)" --quiet
  "$PYTHON" -m preprocessing index-videos --videos "$PREPARE/h264" --out "$PREPARE/h264.json" --workers "$(nproc)" \
      --quiet
  # the index names its folder relative to itself, so the folder can travel
  "$PYTHON" -c 'import json, sys; p = sys.argv[1]; i = json.load(open(p)); i["root"] = "h264"
json.dump(i, open(p, "w"), indent=1)' "$PREPARE/h264.json"
  # ffmpeg's JPEG encoder (the reference's route): ~1.5x smaller than turbo at equal fidelity
  "$PYTHON" -m preprocessing build-lmdb --videos "$PREPARE/h264" --out "$PREPARE/h264.lmdb" --encoder ffmpeg \
      --workers "$(nproc)" --quiet
  "$PYTHON" -c 'import sys; from pathlib import Path; from preprocessing.ffmpeg_tools import locate
from tests.test_gpu import write_video_pair; write_video_pair(Path(sys.argv[1]), locate("ffmpeg"), "gpu")' \
      "$PREPARE/video_pair"
  set +e
  kb=$(du -sk "$PREPARE" | cut -f1)
  echo "prepared $PREPARE: $((kb / 1024)) MB (LMDB h264.lmdb, videos h264.json, NVDEC test files video_pair/)"
  [ "$kb" -le $((24 * 1024)) ] || { echo "gpu_check.sh: $PREPARE is over 24 MB: it would not travel with a DALI part"; exit 1; }
  exit 0
fi

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

if [ "$DRY" = 1 ]; then
  # Same parts, tiny: a 0.0625-wide model on 4-frame 32-px views, batches of 2 and 4.
  DEVICE=cpu BATCHES="2 4" STEPS=2 WARMUP=1 DECODE_STEPS=2
  CFG=(--config configs/quick.yaml model.width=0.0625 proj_hidden=32 proj_dim=16 plan.frames=4 crop_size=32
       train.threads=1)
  BENCH_ARGS=(--threads 1 --workers 0)
  DEADLINE_S=${GPU_CHECK_DEADLINE_S:-900}
  PYTEST_ARGS=(-k "coded_fixture or 420 or forked")   # the GPU tests' own code, CPU vs CPU, a few
  export CSTP_GPU_TESTS_DEVICE=cpu
else
  # 10 timed steps after 3 warm-up ones: each figure is an average over 320-640 samples.
  DEVICE=gpu BATCHES="32 64" STEPS=10 WARMUP=3 DECODE_STEPS=15
  # bf16 explicitly (the GPU default too); DALI: the recipe's 4 threads and 4 workers; the
  # reference loader: one DataLoader worker per CPU core (benchmark.py's default), its best.
  CFG=(--config configs/ucf101.yaml)
  BENCH_ARGS=(--threads 4 --precision bf16)
  DEADLINE_S=${GPU_CHECK_DEADLINE_S:-330}
  PYTEST_ARGS=()
fi
MIN_PART_S=${GPU_CHECK_MIN_PART_S:-20}
SUMMARY_S=25
FIRST_BATCH=${BATCHES%% *}
FAILED=() SKIPPED=()
START=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), +$(( $(date +%s) - START )) s, $(left) s to the deadline)"; }
part() {  # part NAME MAX_S CMD...: CMD under timeout min(MAX_S, time to the deadline); skipped near it
  local name=$1 max=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt "$MIN_PART_S" ]; then
    echo "!! skipped $name: ${remaining} s to the deadline of ${DEADLINE_S} s (GPU_CHECK_DEADLINE_S)"
    SKIPPED+=("$name"); return 1
  fi
  local limit=$(( max < remaining ? max : remaining ))
  echo "+ [$name, at most $limit s] $*"
  timeout -k 5 "$limit" "$@"; local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "!! $name killed after $limit s"; FAILED+=("$name (killed after $limit s)")
  elif [ $rc -ne 0 ]; then
    echo "!! exit $rc: $name"; FAILED+=("$name (exit $rc)")
  fi
  return $rc
}
bench() {  # bench NAME MAX_S ARGS...: one benchmark.py run, its JSON in $WORK/NAME.json, its span in marks.txt
  local name=$1 max=$2; shift 2
  local t0; t0=$(date +%s.%N)
  # the run's own flags last: they win over CFG's and BENCH_ARGS' (e.g. --precision fp32)
  part "$name" "$max" "$PYTHON" benchmark.py "${CFG[@]}" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
      "${BENCH_ARGS[@]}" "$@" --json "$WORK/$name.json"
  local rc=$?
  echo "$name $t0 $(date +%s.%N)" >> "$WORK/marks.txt"
  return $rc
}

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
probe_video_tools
# gpu_guard first: torch asks NVML, so nothing here initialises CUDA
"$PYTHON" - <<'EOF' || { echo "gpu_check.sh: python cannot import what the project needs (see docs/gpu.md)"; exit 2; }
import platform
import gpu_guard
import torch, numpy, lmdb, msgpack, yaml, PIL
import nvidia.dali as dali
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"DALI {dali.__version__}, numpy {numpy.__version__}, lmdb {lmdb.__version__}, {platform.platform()}")
print("GPU visible (NVML):", gpu_guard.gpu_visible())
EOF
if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import gpu_guard, sys; sys.exit(0 if gpu_guard.gpu_visible() else 1)'; then
  echo "gpu_check.sh: no CUDA GPU visible; run with --cpu-dry-run to test the script on a CPU"; exit 2
fi

step "data (prepared here and carried; nothing large is written on the device)"
if [ -z "$DATA$VIDEOS" ] && [ -d data/gpu_check/h264.lmdb ]; then
  DATA=data/gpu_check/h264.lmdb
  [ -f data/gpu_check/h264.json ] && [ "$DEVICE" = gpu ] && VIDEOS=data/gpu_check/h264.json
fi
[ -z "$DATA" ] || [ -e "$DATA" ] || { echo "gpu_check.sh: --data $DATA does not exist"; exit 2; }
[ -z "$VIDEOS" ] || [ -f "$VIDEOS" ] || { echo "gpu_check.sh: --videos $VIDEOS does not exist"; exit 2; }
if [ -z "$DATA" ]; then
  echo "no prepared LMDB (bash scripts/gpu_check.sh --prepare data/gpu_check, here): a small synthetic one"
  part synthetic_lmdb 60 "$PYTHON" -m bench.gpu_data synthetic "$WORK/synthetic.lmdb" "${CFG[@]}" &&
    DATA="$WORK/synthetic.lmdb"
fi
LMDB_ARGS=() VIDEO_ARGS=(--source video)
if [ -n "$DATA" ]; then
  # Logical repetition: a list naming every video often enough for the largest batch's warm-up
  # and timed steps to fit in one epoch; the loaders read the LMDB through it (data.list).
  NEED=$(( (WARMUP + (STEPS > DECODE_STEPS ? STEPS : DECODE_STEPS) + 2) * ${BATCHES##* } ))
  part repeat_list 30 "$PYTHON" -m bench.gpu_data repeat-list "$DATA" "$WORK/repeat.txt" "$NEED" &&
    LMDB_ARGS=(--data "$DATA" --repeat 1 "data.list=$WORK/repeat.txt"
               --data-origin "LMDB $(basename "$DATA"), its videos listed repeatedly (data.list)")
fi
if [ -n "$VIDEOS" ]; then
  VIDEO_ARGS=(--data "$VIDEOS")
fi
echo "LMDB: ${DATA:-none}; videos: ${VIDEOS:-synthetic (one file listed repeatedly)}"

step "1. pytest -m gpu"
part pytest_gpu 150 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py "${PYTEST_ARGS[@]}" \
    > "$WORK/pytest_gpu.log" 2>&1
cat "$WORK/pytest_gpu.log"
tail -n 1 "$WORK/pytest_gpu.log" > "$WORK/pytest_gpu.txt"
if grep -qE '[0-9]+ skipped' "$WORK/pytest_gpu.txt"; then
  echo "!! GPU tests were skipped: counted as a failure"; FAILED+=("pytest -m gpu (skipped tests)")
fi

step "2. data graphs: decoder operators, threads per rank, pipeline build time (batch $FIRST_BATCH)"
if [ -n "$DATA" ]; then
  for graph in lmdb_views lmdb_frames clip; do
    part "graph_$graph" 40 "$PYTHON" -m bench.gpu_data graph-facts --graph "${graph%_*}" --device "$DEVICE" \
        --data "$DATA" --batch "$FIRST_BATCH" --out "$WORK/graph_$graph.json" "${CFG[@]}" "data.list=$WORK/repeat.txt" \
        "data.graph=$([ "$graph" = lmdb_frames ] && echo frames || echo views)"
  done
fi

if [ "$HAVE_SMI" = 1 ]; then
  nvidia-smi dmon -s u -o DT -d 1 > "$OUTDIR/dmon.log" 2>&1 &
  MONITORS+=($!)
  FIELDS=timestamp,utilization.gpu
  for f in utilization.decoder utilization.jpeg; do
    nvidia-smi --query-gpu=$f --format=csv,noheader >/dev/null 2>&1 && FIELDS+=",$f"
  done
  nvidia-smi --query-gpu="$FIELDS" --format=csv,nounits -lms 500 > "$OUTDIR/smi_query.csv" 2>&1 &
  MONITORS+=($!)
fi

b=$FIRST_BATCH
step "3. batch $b: LMDB --all (DALI loader, PIL reference loader, model, e2e)"
bench "all_lmdb_b$b" 120 --all --batch "$b" "${LMDB_ARGS[@]}" --report "$OUTDIR/all_lmdb_b$b.md"
step "3b. batch $b: the LMDB loader on the frames graph (one decoder over B·2·T frames) vs part 3's views graph"
bench "frames_loader_b$b" 45 loader --batch "$b" "${LMDB_ARGS[@]}" data.graph=frames
step "4. batch $b: video files (NVDEC): e2e, loader"
bench "video_e2e_b$b" 45 e2e --batch "$b" "${VIDEO_ARGS[@]}"
bench "video_loader_b$b" 45 loader --batch "$b" "${VIDEO_ARGS[@]}"
step "5. LMDB JPEG decode: roi vs full, loader mode, batch $b, $DECODE_STEPS steps"
for mode in roi full; do
  STEPS=$DECODE_STEPS bench "decode_${mode}_b$b" 40 loader --decode "$mode" --batch "$b" "${LMDB_ARGS[@]}"
done
step "6. model: fp32 / fp32 channels-last / bf16 channels-last, batch $b (bf16 plain: part 3)"
bench model_fp32 30 model --batch "$b" --precision fp32
bench model_fp32_cl 30 model --batch "$b" --precision fp32 --channels-last
bench model_bf16_cl 30 model --batch "$b" --precision bf16 --channels-last
for b in ${BATCHES#* }; do
  step "7. batch $b: LMDB --all; video files: loader, e2e"
  bench "all_lmdb_b$b" 120 --all --batch "$b" "${LMDB_ARGS[@]}"
  bench "video_loader_b$b" 45 loader --batch "$b" "${VIDEO_ARGS[@]}"
  bench "video_e2e_b$b" 45 e2e --batch "$b" "${VIDEO_ARGS[@]}"
done

for pid in "${MONITORS[@]}"; do kill "$pid" 2>/dev/null; done
MONITORS=()
rm -f "$OUTDIR"/all_lmdb_b*.png   # the device tool brings back 8 files; the numbers are in the .md
"$PYTHON" -c 'import json, sys; print(json.dumps([r for p in sys.argv[1:] for r in json.load(open(p))], indent=1))' \
    "$WORK"/graph_*.json > "$OUTDIR/graph_facts.json" 2>/dev/null || rm -f "$OUTDIR/graph_facts.json"
step "summary"
timeout -k 5 "$SUMMARY_S" "$PYTHON" benchmark.py gpu-check-summary "$WORK" "$OUTDIR" > /dev/null || FAILED+=("summary")
timeout -k 5 "$SUMMARY_S" "$PYTHON" -m bench.gpu_data summary "$WORK" >> "$OUTDIR/summary.txt" || FAILED+=("summary")
{
  echo
  echo "parts skipped at the deadline (${DEADLINE_S} s): ${SKIPPED[*]:-none}"
  echo "parts failed: ${FAILED[*]:-none}"
  echo "wall time $(( $(date +%s) - START )) s"
} >> "$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
echo "results in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
[ ${#FAILED[@]} -eq 0 ] && [ ${#SKIPPED[@]} -eq 0 ] || exit 1
