#!/usr/bin/env bash
# One call on a machine with a CUDA GPU that checks what the CPU tests cannot, in under 8 minutes:
#   (a) nnUNetv2_train, a few short epochs of 3d_fullres with nnU-Net's defaults (fp16 autocast + GradScaler,
#       torch.compile, test-time mirroring), for M4oE and for a merged model (`moe_nnunet merge` of that M4oE model and
#       nnU-Net's own network, trained here too), on a small generated phantom dataset;
#   (b) M4oE through nnU-Net's DDP path at world size 1, started by torchrun. nnU-Net's `-num_gpus 1` trains without
#       DDP (it spawns DDP processes only for 2 or more), so torchrun starts nnU-Net's own DDP entry (run_ddp) in one
#       process instead: NCCL process group, DDP-wrapped compiled network, the DDP loss and gathers;
#   (c) moe_nnunet bench at 4 channels, 128^3, batch 2, bf16, eager and compiled, with model FLOP utilisation;
#   (d) nnU-Net's sliding-window prediction of one whole 256^3 case, ours / nnU-Net's network;
# then prints one table (pass / fail / timeout / skipped and the figures of each step) and writes it as JSON to
# OUTPUT_DIR/gpu_check.json. Exits 1 if a step did not pass, 2 if there is no GPU.
#
#   bash scripts/gpu_check.sh [--cpu-dry-run] [--wheels DIR] [OUTPUT_DIR]       (default OUTPUT_DIR: ./gpu_check_output)
#   bash scripts/gpu_check.sh --fetch-wheels DIR      # with internet: the wheels a GPU machine without it needs
#
# --cpu-dry-run runs the same steps on the CPU at tiny sizes (the test does); there nnU-Net neither compiles nor
# uses fp16, the bench cannot compile (its compiled step runs eager), and the DDP step only forms torchrun's process
# group (gloo), because nnU-Net's DDP trainer needs CUDA. Every step runs under `timeout` (its own limit, times
# GPU_CHECK_STEP_LIMIT_SCALE, default 1), and the whole run within GPU_CHECK_BUDGET_S seconds (default 460; 600 for a
# dry run): a step that would start with less than 20 s left is skipped. The three trainings of (a) and (b) run side
# by side (the GPU has room; their seconds per epoch are therefore not those of one training alone); the benchmarks
# run alone.
# Environment: MOE_NNUNET_VENV (default .venv; reused when moe_nnunet and nnU-Net import, else made with the
# machine's own torch: --system-site-packages), MOE_NNUNET_WHEELS (as --wheels: install offline from these wheels),
# GPU_CHECK_PEAK_TFLOPS (bf16 peak for the MFU; default 790, the matrix-product rate measured on H100 and H200
# machines, whose data-sheet peak is 989), MOE_NNUNET_GPU_CHECK_SCHEDULE (the trainings' EPOCHS,ITERATIONS,
# VALIDATION_ITERATIONS; default 3,20,5).
set -uo pipefail
SELF="$(realpath "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
HELPER="$ROOT/moe_nnunet/profiling/gpu_check.py"
VENV="${MOE_NNUNET_VENV:-$ROOT/.venv}"

# ---------------------------------------------------------------------------------------------------- the steps
# Each runs as `bash gpu_check.sh --step NAME` in a process of its own under `timeout`, with the settings exported.
step_setup() {
  if "$VENV/bin/python" -c "import moe_nnunet.trainers, nnunetv2, torch" 2>/dev/null; then
    echo "reusing $VENV"; return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV on the machine's own torch (--system-site-packages)"
    "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" || return 1
  fi
  if [ -n "${WHEELS:-}" ]; then  # offline: exactly the wheels given, nothing from an index
    "$VENV/bin/python" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || return 1
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" || return 1
  else
    "$VENV/bin/python" -m pip install -q -e "$ROOT" || return 1
  fi
  "$VENV/bin/python" -c "import moe_nnunet.trainers, nnunetv2, torch; print('torch', torch.__version__)"
}

step_prepare() {  # as nnUNetv2_plan_and_preprocess, moe_nnunet plan and nnUNetv2_preprocess, in one process
  python -c "from moe_nnunet.datasets.phantom import build_phantom, plan_phantom
print(build_phantom('$nnUNet_raw', $ID, name='GpuCheckPhantom', num_cases=$CASES, shape=($CASE_SHAPE)))
print('plans:', plan_phantom($ID, '3d_fullres', $NPROC))"
}

train() { nnUNet_n_proc_DA="$DA" nnUNetv2_train "$ID" 3d_fullres "$@" -device "$DEVICE"; }
step_train_m4oe() { train 0 -tr nnUNetTrainerM4oE_gpucheck -p nnUNetM4oEPlans; }
step_train_nnunet() { train 0 -tr nnUNetTrainer_gpucheck -p nnUNetPlans; }

step_train_ddp() {  # fold 1, beside the fold 0 of train_m4oe
  local extra=(); [ "$DRY" = 1 ] && extra=(--launcher_only)
  nnUNet_n_proc_DA="$DA" python -m torch.distributed.run --standalone --nproc_per_node 1 -m moe_nnunet.profiling.gpu_check ddp_train \
    "$ID" 3d_fullres 1 -tr nnUNetTrainerM4oE_gpucheck -p nnUNetM4oEPlans "${extra[@]}"
}

step_merge() {
  moe_nnunet merge -d "$ID" -o nnUNetMergedPlans -m "$RESULTS/nnUNetTrainerM4oE_gpucheck__nnUNetM4oEPlans__3d_fullres" \
    "$RESULTS/nnUNetTrainer_gpucheck__nnUNetPlans__3d_fullres"
}

step_train_merged() { train 0 -tr nnUNetTrainerMoEMerge_gpucheck -p nnUNetMergedPlans; }

bench() {  # the synthetic 4-channel comparison, ours against nnU-Net's PlainConvUNet
  # shellcheck disable=SC2086
  moe_nnunet bench --synthetic --channels 4 --patch_size $BENCH_PATCH --batch_size "$BENCH_BATCH" --references none \
    --device "$DEVICE" $BENCH_FLAGS "$@"
}
step_bench_eager() { bench --peak_tflops "$PEAK" --iterations "$BENCH_ITERATIONS" --warmup "$BENCH_WARMUP" --json "$OUT/bench_eager.json"; }
step_bench_compiled() {
  local compile=(--compile); [ "$DRY" = 1 ] && compile=()  # the bench compiles on CUDA only, as nnU-Net
  bench --peak_tflops "$PEAK" --iterations "$BENCH_ITERATIONS" --warmup "$BENCH_WARMUP" --json "$OUT/bench_compiled.json" "${compile[@]}"
}
# shellcheck disable=SC2086
step_sliding_window() { bench --iterations 1 --warmup 1 --case_size $CASE_SIZE --case_repeats "$CASE_REPEATS" --json "$OUT/sliding_window.json"; }

if [ "${1:-}" = --step ]; then
  "step_$2"
  exit $?
fi

# ---------------------------------------------------------------------------------------------------- arguments
DRY=0; OUT=""; WHEELS="${MOE_NNUNET_WHEELS:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --wheels) WHEELS="$(realpath "$2")"; shift ;;
    --fetch-wheels)
      # what moe_nnunet and nnU-Net import that a PyTorch GPU image (Python 3.12 with torch, numpy, scipy,
      # scikit-image, pandas, matplotlib, timm, einops, httpx, requests, msgpack, ...) lacks, at the versions the tests
      # use: the pure-Python packages built here as wheels for any platform, the compiled ones fetched for the GPU
      # machine's Python (about 70 MB, SimpleITK 53 MB of it)
      mkdir -p "$2" && py="$VENV/bin/python" && { [ -x "$py" ] || py="${PYTHON:-python3}"; }
      "$py" -m pip wheel -q --no-deps -w "$2" nnunetv2==2.8.1 acvl-utils==0.2.6 dynamic-network-architectures==0.4.4 \
        batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 nibabel==5.4.2 graphviz==0.21 yacs==0.1.8 || exit 1
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$2" \
        SimpleITK==2.5.7 blosc2==4.15.0 ndindex==1.10.1 connected-components-3d==4.1.1 || exit 1
      du -sh "$2"; exit 0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
OUT="$(realpath -m "${OUT:-gpu_check_output}")"

# ---------------------------------------------------------------------------------------------------- a GPU?
cuda_device_name() {  # the first CUDA device's name, from torch (or else nvidia-smi); fails when there is none
  local py
  case "${CUDA_VISIBLE_DEVICES-unset}" in ""|-1) return 1 ;; esac
  if ! command -v nvidia-smi >/dev/null && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then return 1; fi
  for py in "$VENV/bin/python" "${PYTHON:-python3}"; do
    if command -v "$py" >/dev/null && "$py" -c "import torch" 2>/dev/null; then
      "$py" -c "import sys, torch; ok = torch.cuda.is_available(); print(torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)"
      return
    fi
  done
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep .
}
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; DEVICE_NAME="CPU ($(nproc) cores), dry run"
elif DEVICE_NAME="$(cuda_device_name 2>/dev/null)"; then
  DEVICE=cuda
else
  echo "gpu_check: no CUDA GPU is visible (no NVIDIA device, CUDA_VISIBLE_DEVICES hides them, or torch sees none)," \
       "and this check is for a GPU. On a machine without one, 'bash scripts/gpu_check.sh --cpu-dry-run' runs the same steps" \
       "on the CPU at tiny sizes." >&2
  exit 2
fi

# ---------------------------------------------------------------------------------------------------- settings
ID=975
if [ "$DRY" = 1 ]; then
  BUDGET="${GPU_CHECK_BUDGET_S:-600}"; SCHEDULE="1,2,1"; CASES=5; CASE_SHAPE="24, 40, 40"; NPROC=1
  BENCH_PATCH="8 16 16"; BENCH_BATCH=1; BENCH_ITERATIONS=1; BENCH_WARMUP=0; BENCH_FLAGS="--no_memory"
  CASE_SIZE="8 16 24"; CASE_REPEATS=1; PEAK="${GPU_CHECK_PEAK_TFLOPS:-1}"; DA=0
else
  BUDGET="${GPU_CHECK_BUDGET_S:-460}"; SCHEDULE="${MOE_NNUNET_GPU_CHECK_SCHEDULE:-3,20,5}"; CASES=10
  CASE_SHAPE="40, 80, 80"; NPROC=4
  BENCH_PATCH="128 128 128"; BENCH_BATCH=2; BENCH_ITERATIONS=10; BENCH_WARMUP=3; BENCH_FLAGS="--bf16"
  CASE_SIZE="256 256 256"; CASE_REPEATS=2; PEAK="${GPU_CHECK_PEAK_TFLOPS:-790}"; DA=4
fi
STEP_LIMIT_SCALE="${GPU_CHECK_STEP_LIMIT_SCALE:-1}"  # a slow or busy machine: every step's own limit times this
PY="$VENV/bin/python"; [ -x "$PY" ] || PY="${PYTHON:-python3}"
rm -rf "$OUT/nnUNet_raw" "$OUT/nnUNet_preprocessed" "$OUT/nnUNet_results" "$OUT/logs" "$OUT/steps" \
  "$OUT/ext_trainers" "$OUT"/bench_*.json "$OUT/sliding_window.json" "$OUT/gpu_check.json"
mkdir -p "$OUT/logs" "$OUT/ext_trainers"
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
export RESULTS="$nnUNet_results/Dataset${ID}_GpuCheckPhantom"
# data augmentation workers: nnUNetv2_train's (0 = in the training process); the planner needs at least 1
export MOE_NNUNET_GPU_CHECK_SCHEDULE="$SCHEDULE" nnUNet_n_proc_DA="$NPROC" nnUNet_def_n_proc="$NPROC"
export OUT DRY ID DEVICE DA WHEELS VENV CASES CASE_SHAPE NPROC BENCH_PATCH BENCH_BATCH BENCH_ITERATIONS BENCH_WARMUP \
  BENCH_FLAGS CASE_SIZE CASE_REPEATS PEAK PYTHONUNBUFFERED=1 PATH="$VENV/bin:$PATH"
# nnU-Net finds the check's trainers through a shim in an nnUNet_extTrainer folder of the output
echo "from moe_nnunet.profiling.gpu_check_trainers import *  # noqa: F401,F403" > "$OUT/ext_trainers/moe_nnunet_gpu_check_trainers.py"

START=$SECONDS
# run_step NAME LIMIT [NEEDS...]: `bash gpu_check.sh --step NAME` under timeout (LIMIT, or what the budget has left)
run_step() {
  local name="$1" limit="$2" need left status log="$OUT/logs/$1.log" extra=()
  shift 2
  for need in "$@"; do
    if [ "$(cat "$OUT/steps/$need.status" 2>/dev/null)" != pass ]; then
      "$PY" "$HELPER" record "$OUT" "$name" skipped 0 --note "needs $need, which did not pass"
      echo skipped > "$OUT/steps/$name.status"; return
    fi
  done
  limit=$(( limit * STEP_LIMIT_SCALE )); left=$(( START + BUDGET - SECONDS )); [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    "$PY" "$HELPER" record "$OUT" "$name" skipped 0 --note "the ${BUDGET} s budget was spent"
    echo skipped > "$OUT/steps/$name.status"; return
  fi
  echo "[gpu_check] $(( SECONDS - START )) s: $name (at most $limit s; log: $log)"
  local t0=$SECONDS
  timeout -k 10 "$limit" bash "$SELF" --step "$name" > "$log" 2>&1
  local rc=$?
  case $rc in 0) status=pass ;; 124|137) status=timeout ;; *) status=fail ;; esac
  case "$name" in
    train_m4oe) extra=(--model "$RESULTS/nnUNetTrainerM4oE_gpucheck__nnUNetM4oEPlans__3d_fullres/fold_0") ;;
    train_nnunet) extra=(--model "$RESULTS/nnUNetTrainer_gpucheck__nnUNetPlans__3d_fullres/fold_0") ;;
    train_ddp) extra=(--model "$RESULTS/nnUNetTrainerM4oE_gpucheck__nnUNetM4oEPlans__3d_fullres/fold_1") ;;
    train_merged) extra=(--model "$RESULTS/nnUNetTrainerMoEMerge_gpucheck__nnUNetMergedPlans__3d_fullres/fold_0") ;;
    bench_*|sliding_window) extra=(--json "$OUT/$name.json") ;;
  esac
  [ "$status" = timeout ] && extra+=(--note "stopped after $limit s")
  "$PY" "$HELPER" record "$OUT" "$name" "$status" $(( SECONDS - t0 )) --rc "$rc" --log "$log" "${extra[@]}"
  echo "$status" > "$OUT/steps/$name.status"
  echo "[gpu_check] $(( SECONDS - START )) s: $name $status"
}

mkdir -p "$OUT/steps"
run_step setup 240
PY="$VENV/bin/python"; [ -x "$PY" ] || PY="${PYTHON:-python3}"
if [ "$(cat "$OUT/steps/setup.status")" = pass ]; then
  export nnUNet_extTrainer="$(moe_nnunet trainer_path):$OUT/ext_trainers"
fi
run_step prepare 150 setup
# (a) and (b): the three trainings side by side
run_step train_m4oe 240 prepare &
run_step train_nnunet 180 prepare &
run_step train_ddp 240 prepare &
wait
run_step merge 60 train_m4oe train_nnunet
run_step train_merged 150 merge
# (c) and (d): alone on the device
run_step bench_eager 120 setup
run_step bench_compiled 200 setup
run_step sliding_window 120 setup
"$PY" "$HELPER" report "$OUT" --mode "$([ "$DRY" = 1 ] && echo cpu-dry-run || echo gpu)" --device "$DEVICE_NAME" \
  --budget "$BUDGET" --wall $(( SECONDS - START ))
