#!/usr/bin/env bash
# Every GPU check of CSTP-DALI in one run, for a lent GPU session (one H100/H200,
# DALI installed into /tmp/site as in ../shared/device/README.md):
#
#   1. records the card (`nvidia-smi --query-gpu=name --format=csv`) and the versions;
#   2. gets an LMDB: --data DB if given (e.g. a carried data/rc.lmdb); else real clips
#      (--clips DIR, or shared/data/real-clips in the copied tree) through
#      `python -m preprocessing build-lmdb --short-side 256`; else the demo set
#      (`python -m preprocessing demo-data` then `build-lmdb`); both need ffmpeg. Without
#      ffmpeg, benchmark.py's own synthetic LMDB;
#   3. runs the pytest tests marked gpu, if there are any;
#   4. benchmark.py --all --device gpu at per-GPU batch 32 and 64 in bf16
#      (configs/ucf101.yaml: R(2+1)D-10 width 1.0, 16 frames, 112 px);
#   5. benchmark.py model at batch 32: fp32 vs bf16, without and with channels-last;
#   6. prints a short table last.
#
# Results go to $OUT (or --out DIR): gpu_check.log, gpu.csv, results.json, summary.txt,
# all_b32.md/.png, all_b64.md/.png (8 files: what the device tool brings back).
#
#   bash scripts/gpu_check.sh                    # on the GPU machine, after the DALI install
#   bash scripts/gpu_check.sh --data data/rc.lmdb
#   bash scripts/gpu_check.sh --cpu-dry-run      # the same steps, tiny, on a CPU (to test this script)
#
# Exit status: 0 all steps ran; 1 a step failed (the others still ran); 2 bad arguments
# or a missing prerequisite (no GPU, no DALI).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 DATA="" CLIPS="" OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --data) DATA="${2:?--data needs an LMDB path}"; shift ;;
    --clips) CLIPS="${2:?--clips needs a folder}"; shift ;;
    --out) OUTDIR="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || OUTDIR=$(mktemp -d /tmp/gpu_check_out.XXXXXX)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1

[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "$DRY" = 1 ]; then
  # Same steps, tiny: a 0.0625-wide model on 4-frame 32-px views, two small batches.
  DEVICE=cpu BATCHES="2 4" MODEL_BATCH=2 STEPS=2 WARMUP=1 SHORT_SIDE=64 LIMIT=300
  CFG=(--config configs/demo.yaml model.width=0.0625 proj_hidden=32 proj_dim=16 plan.frames=4 crop_size=32
       train.threads=1 --threads 1 --workers 0)
else
  DEVICE=gpu BATCHES="32 64" MODEL_BATCH=32 STEPS=15 WARMUP=5 SHORT_SIDE=256 LIMIT=240
  CFG=(--config configs/ucf101.yaml)
fi
FAILED=()
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
run() {  # run CMD...: a step that may fail without stopping the others
  echo "+ $*"
  "$@"; local rc=$?
  [ $rc -eq 0 ] || { echo "!! exit $rc: $*"; FAILED+=("$*"); }
  return $rc
}

step "machine"
date -u
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name --format=csv | tee "$OUTDIR/gpu.csv"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
  printf 'name\n(no nvidia-smi on this machine)\n' | tee "$OUTDIR/gpu.csv"
fi
"$PYTHON" - <<'EOF' || { echo "gpu_check.sh: python cannot import what the project needs (see ../shared/device/README.md)"; exit 2; }
import importlib.metadata as md, platform, sys
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
DATA_ARGS=()
if [ -n "$DATA" ]; then
  [ -e "$DATA" ] || { echo "gpu_check.sh: --data $DATA does not exist"; exit 2; }
  DATA_ARGS=(--data "$DATA"); echo "using the LMDB $DATA"
else
  if [ -z "$CLIPS" ]; then
    for d in shared/data/real-clips ../shared/data/real-clips data/real-clips; do
      [ -d "$d" ] && { CLIPS=$d; break; }
    done
  fi
  if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
    if [ -n "$CLIPS" ]; then
      run "$PYTHON" -m preprocessing build-lmdb --videos "$CLIPS" --out "$WORK/clips.lmdb" \
          --short-side "$SHORT_SIDE" --workers "$(nproc)" --quiet && DATA_ARGS=(--data "$WORK/clips.lmdb")
    else
      run "$PYTHON" -m preprocessing demo-data --out "$WORK/demo" --workers "$(nproc)" &&
        run "$PYTHON" -m preprocessing build-lmdb --videos "$WORK/demo/videos" --list "$WORK/demo/train.txt" \
            --out "$WORK/demo.lmdb" --workers "$(nproc)" --quiet && DATA_ARGS=(--data "$WORK/demo.lmdb")
    fi
  else
    echo "no ffmpeg here${CLIPS:+ (clips found in $CLIPS but they cannot be decoded)}"
  fi
  [ ${#DATA_ARGS[@]} -gt 0 ] || echo "falling back to benchmark.py's synthetic colour-coded LMDB"
fi

step "pytest -m gpu"
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests; rc=$?
case $rc in
  0) echo "gpu tests passed" ;;
  5) echo "no tests are marked gpu" ;;
  *) echo "!! gpu tests failed (exit $rc)"; FAILED+=("pytest -m gpu") ;;
esac

step "benchmark --all, bf16"
for b in $BATCHES; do
  run timeout "$LIMIT" "$PYTHON" benchmark.py --all --device "$DEVICE" --batch "$b" --precision bf16 \
      --steps "$STEPS" --warmup "$WARMUP" "${CFG[@]}" "${DATA_ARGS[@]}" \
      --json "$WORK/all_b$b.json" --report "$OUTDIR/all_b$b.md"
done

step "benchmark model: fp32 / bf16 × channels-last off / on, batch $MODEL_BATCH"
for precision in fp32 bf16; do
  for cl in "" --channels-last; do
    run timeout "$LIMIT" "$PYTHON" benchmark.py model --device "$DEVICE" --batch "$MODEL_BATCH" \
        --precision "$precision" $cl --steps "$STEPS" --warmup "$WARMUP" "${CFG[@]}" \
        --json "$WORK/model_${precision}${cl:+_cl}.json"
  done
done

echo; echo "results in $OUTDIR: gpu_check.log gpu.csv results.json summary.txt all_b*.md (+ .png with matplotlib)"
[ ${#FAILED[@]} -eq 0 ] || echo "FAILED steps: ${FAILED[*]}"
step "summary"
"$PYTHON" - "$WORK" "$OUTDIR" <<'EOF'
import glob, json, os, sys
work, out = sys.argv[1:]
load = lambda p: json.load(open(p))
paths = sorted(glob.glob(f"{work}/all_b*.json"), key=lambda p: int(p.rsplit("_b", 1)[1][:-5]))
paths += sorted(glob.glob(f"{work}/model_*.json"))
runs = {os.path.basename(p)[:-5]: load(p) for p in paths}
gpu = open(f"{out}/gpu.csv").read().splitlines()[1:] or ["?"]
json.dump({"gpu": gpu, "runs": runs}, open(f"{out}/results.json", "w"), indent=2)
rows = [("run", "batch", "prec", "samples/s", "frames/s", "ms/step", "wait", "e2e/model", "DALI/ref")]
for name, r in runs.items():
    if r["mode"] == "all":
        for sub in r["results"].values():
            rows.append((f"{sub['mode']} {sub['loader'] or ''}".strip(), sub["batch"], sub["precision"],
                         f"{sub['samples_per_s']:.1f}", f"{sub['frames_per_s']:.0f}", f"{sub['step_ms']:.1f}",
                         f"{sub['data_wait_fraction']:.1%}" if sub["data_wait_fraction"] is not None else "-",
                         "", ""))
        rows.append((f"= batch {r['batch']} ratios", "", "", "", "", "", "",
                     f"{r['compute_bound_ratio']:.2f}", f"{r['loader_speedup']:.2f}x"))
    else:
        rows.append((f"model{' channels-last' if r['channels_last'] else ''}", r["batch"], r["precision"],
                     f"{r['samples_per_s']:.1f}", f"{r['frames_per_s']:.0f}", f"{r['step_ms']:.1f}", "-", "", ""))
widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
first = next(iter(runs.values()), {})
lines = [f"GPU: {', '.join(gpu)}; device {first.get('device')}; data: {first.get('data') or 'synthetic'}"]
lines += ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
          for row in rows]
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
[ $? -eq 0 ] || FAILED+=("summary")
[ ${#FAILED[@]} -eq 0 ] || exit 1
