#!/usr/bin/env bash
# Missing-modality benchmark: nnU-Net (missing channel zero-filled), nnU-Net trained with channel dropout, and
# M4oE, trained on the same multi-channel dataset with the same schedule; then per-label Dice on fold 0's held-out cases with
# the full input and with each modality removed (`moe_nnunet robustness`).
#
#   bash scripts/bench_missing_modality.sh [OUTPUT_DIR] [cpu|cuda]
#
# cpu: the CPU demo's schedule (6 epochs x 10 iterations); cuda: 100 epochs of 250 iterations.
# Results: OUTPUT_DIR/robustness/robustness.md and .json. Environment: DATASET (a `moe_nnunet datasets` name:
# phantom, the default, or icbm_flair_lesions), DATASET_ID (905 for the phantom, else the dataset's default),
# NUM_CASES (default 20);
# TWO_STAGE=1 also trains M4oE's two-stage recipe (nnUNetTrainerM4oEExperts -> nnUNetTrainerM4oEGate) and
# compares it too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="$(realpath -m "${1:-bench_missing_modality}")"
DEVICE="${2:-cpu}"
DATASET="${DATASET:-phantom}"
if [ "$DATASET" = phantom ]; then ID="${DATASET_ID:-905}"; else ID="${DATASET_ID:-906}"; fi
# nnU-Net's default of 8 processes for export and evaluation is slow on small machines
nnUNet_def_n_proc="${nnUNet_def_n_proc:-$(( $(nproc) >= 8 ? 4 : 1 ))}"; export nnUNet_def_n_proc
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
export PATH="$VENV/bin:$PATH"
export nnUNet_extTrainer="$(moe_nnunet trainer_path)"
if [ "$DEVICE" = cuda ]; then
  BASE=nnUNetTrainer_100epochs; CD=nnUNetTrainerChannelDropout_100epochs; MOE=nnUNetTrainerM4oE_100epochs
  S1=nnUNetTrainerM4oEExperts; S2=nnUNetTrainerM4oEGate
else
  BASE=nnUNetTrainerDemo; CD=nnUNetTrainerChannelDropout_demo; MOE=nnUNetTrainerM4oE_demo
  S1=nnUNetTrainerM4oEExperts_demo; S2=nnUNetTrainerM4oEGate_demo
fi
timed() { local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s] $*" | tee -a "$OUT/timings.txt"; }

ls "$nnUNet_raw"/Dataset${ID}_* >/dev/null 2>&1 || \
  timed moe_nnunet datasets build "$DATASET" --id "$ID" --num_cases "${NUM_CASES:-20}"
[ -f "$nnUNet_preprocessed"/Dataset${ID}_*/nnUNetPlans.json ] || \
  timed nnUNetv2_plan_and_preprocess -d "$ID" -c 3d_fullres -np "$nnUNet_def_n_proc" -npfp "$nnUNet_def_n_proc" \
    --verify_dataset_integrity
[ -f "$nnUNet_preprocessed"/Dataset${ID}_*/nnUNetM4oEPlans.json ] || timed moe_nnunet plan -d "$ID"
for spec in "$BASE nnUNetPlans" "$CD nnUNetPlans" "$MOE nnUNetM4oEPlans"; do
  set -- $spec
  ls "$nnUNet_results"/Dataset${ID}_*/"$1__$2__3d_fullres"/fold_0/checkpoint_final.pth >/dev/null 2>&1 || \
    timed nnUNetv2_train "$ID" 3d_fullres 0 -tr "$1" -p "$2" -device "$DEVICE" > "$OUT/train_$1.log" 2>&1
done
TRAINERS=("$BASE" "$CD" "$MOE"); PLANS=(nnUNetPlans nnUNetPlans nnUNetM4oEPlans)
if [ "${TWO_STAGE:-0}" = 1 ]; then
  M="$(ls -d "$nnUNet_results"/Dataset${ID}_*)/"
  [ -f "$M$S1"__nnUNetM4oEPlans__3d_fullres/fold_0/checkpoint_final.pth ] || \
    timed nnUNetv2_train "$ID" 3d_fullres 0 -tr "$S1" -p nnUNetM4oEPlans -device "$DEVICE" > "$OUT/train_$S1.log" 2>&1
  [ -f "$M$S2"__nnUNetM4oEPlans__3d_fullres/fold_0/checkpoint_final.pth ] || \
    timed nnUNetv2_train "$ID" 3d_fullres 0 -tr "$S2" -p nnUNetM4oEPlans -device "$DEVICE" \
      -pretrained_weights "$M$S1"__nnUNetM4oEPlans__3d_fullres/fold_0/checkpoint_final.pth > "$OUT/train_$S2.log" 2>&1
  TRAINERS+=("$S2"); PLANS+=(nnUNetM4oEPlans)
fi
timed moe_nnunet robustness -d "$ID" -c 3d_fullres -tr "${TRAINERS[@]}" -p "${PLANS[@]}" \
  -f 0 -o "$OUT/robustness" -device "$DEVICE" $([ "$DEVICE" = cuda ] && echo --tta || echo -np 0)
