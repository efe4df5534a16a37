#!/usr/bin/env bash
# Non-forgetting benchmark of `moe_nnunet merge` (SAM-Med3D-MoE's setting) on the SYNTHETIC 3-channel phantom:
#   1. a general model trained on all labels;
#   2. a specialist fine-tuned from it (-pretrained_weights) on a derived dataset that keeps only the label the
#      general model segments worst on its fold-0 validation (so the specialist predicts that label only);
#   3. the two merged, frozen, with a gate trained on the general dataset (nnUNetTrainerMoEMerge);
# then per-label Dice of all three on the same held-out test cases, which no model trained on (nnU-Net's
# nnUNetv2_evaluate_folder).
#
#   bash scripts/bench_merge.sh [OUTPUT_DIR] [cpu|cuda]
#
# cpu: the CPU demo's schedule for every model (6 epochs x 10 iterations: nnUNetTrainerDemo, then
# nnUNetTrainerMoEMerge_demo for the gate); cuda: 100 epochs (nnUNetTrainer_100epochs, nnUNetTrainerMoEMerge).
# Predictions without test-time mirroring, for all three alike. Results: OUTPUT_DIR/dice.md and dice.json; every
# command run is in OUTPUT_DIR/commands.txt, its output in OUTPUT_DIR/logs/. Finished steps are reused.
# Environment: GENERAL_ID (default 911), SPECIALIST_ID (912), NUM_TRAIN (20), NUM_TEST (10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="$(realpath -m "${1:-bench_merge}")"
DEVICE="${2:-cpu}"
G="${GENERAL_ID:-911}"; S="${SPECIALIST_ID:-912}"
if [ "$DEVICE" = cuda ]; then TR=nnUNetTrainer_100epochs; GATE=nnUNetTrainerMoEMerge; else
  TR=nnUNetTrainerDemo; GATE=nnUNetTrainerMoEMerge_demo; fi
nnUNet_def_n_proc="${nnUNet_def_n_proc:-$(( $(nproc) >= 8 ? 4 : 1 ))}"; export nnUNet_def_n_proc
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$OUT/logs"
export PATH="$VENV/bin:$PATH"
export nnUNet_extTrainer="$(moe_nnunet trainer_path)"
NP=(-np "$nnUNet_def_n_proc")

# step NAME DONE_FILE COMMAND...: run COMMAND (output in logs/NAME.log) unless DONE_FILE exists
step() {
  local name="$1" done="$2"; shift 2
  if [ -e "$done" ]; then echo "[done] $name"; return; fi
  echo "$*" >> "$OUT/commands.txt"
  local t0=$SECONDS
  "$@" > "$OUT/logs/$name.log" 2>&1 || { echo "[failed] $name: see $OUT/logs/$name.log" >&2; exit 1; }
  echo "[$(( SECONDS - t0 )) s] $name" | tee -a "$OUT/timings.txt"
}

RAW_G="$nnUNet_raw/Dataset${G}_MergePhantom"; RAW_S="$nnUNet_raw/Dataset${S}_MergePhantomSpecialist"
PRE_G="$nnUNet_preprocessed/Dataset${G}_MergePhantom"; PRE_S="$nnUNet_preprocessed/Dataset${S}_MergePhantomSpecialist"
GENERAL="$nnUNet_results/Dataset${G}_MergePhantom/${TR}__nnUNetPlans__3d_fullres"
SPECIALIST="$nnUNet_results/Dataset${S}_MergePhantomSpecialist/${TR}__nnUNetPlans_general__3d_fullres"
MERGED="$nnUNet_results/Dataset${G}_MergePhantom/${GATE}__nnUNetMergedPlans__3d_fullres"

step prepare "$RAW_G" python -m moe_nnunet.profiling.merge_bench prepare "$nnUNet_raw" "$G" \
  --num_train "${NUM_TRAIN:-20}" --num_test "${NUM_TEST:-10}"
step plan_general "$PRE_G/nnUNetPlans_3d_fullres" nnUNetv2_plan_and_preprocess -d "$G" -c 3d_fullres "${NP[@]}" \
  -npfp "$nnUNet_def_n_proc" --verify_dataset_integrity
step train_general "$GENERAL/fold_0/checkpoint_final.pth" nnUNetv2_train "$G" 3d_fullres 0 -tr "$TR" -device "$DEVICE"

LABEL="$(python -m moe_nnunet.profiling.merge_bench weakest "$GENERAL/fold_0/validation/summary.json" "$RAW_G/dataset.json")"
echo "the general model's weakest label on its fold-0 validation: $LABEL"
step derive "$RAW_S" python -m moe_nnunet.profiling.merge_bench derive "$nnUNet_raw" "$G" "$S" MergePhantomSpecialist "$LABEL"
# nnU-Net's recipe for fine-tuning on another dataset: plan it, then give it the pretrained model's plans
step plan_specialist "$PRE_S/dataset.json" nnUNetv2_plan_and_preprocess -d "$S" -c 3d_fullres --no_pp \
  -npfp "$nnUNet_def_n_proc"
step move_plans "$PRE_S/nnUNetPlans_general.json" nnUNetv2_move_plans_between_datasets -s "$G" -t "$S" \
  -sp nnUNetPlans -tp nnUNetPlans_general
step preprocess_specialist "$PRE_S/nnUNetPlans_general_3d_fullres" nnUNetv2_preprocess -d "$S" \
  -plans_name nnUNetPlans_general -c 3d_fullres "${NP[@]}"
step splits "$PRE_S/splits_final.json" cp "$PRE_G/splits_final.json" "$PRE_S/"   # the same fold-0 training cases
step train_specialist "$SPECIALIST/fold_0/checkpoint_final.pth" nnUNetv2_train "$S" 3d_fullres 0 -tr "$TR" \
  -p nnUNetPlans_general -device "$DEVICE" -pretrained_weights "$GENERAL/fold_0/checkpoint_final.pth"

step merge "$PRE_G/nnUNetMergedPlans.json" moe_nnunet merge -d "$G" -m "$GENERAL" "$SPECIALIST" -o nnUNetMergedPlans
step train_gate "$MERGED/fold_0/checkpoint_final.pth" nnUNetv2_train "$G" 3d_fullres 0 -tr "$GATE" \
  -p nnUNetMergedPlans -device "$DEVICE"

PREDICT=(-f 0 -device "$DEVICE" --disable_tta -npp 1 -nps 1)
step predict_general "$OUT/pred_general/summary.json" nnUNetv2_predict -i "$RAW_G/imagesTs" -o "$OUT/pred_general" \
  -d "$G" -c 3d_fullres -tr "$TR" -p nnUNetPlans "${PREDICT[@]}"
step predict_specialist "$OUT/pred_specialist/summary.json" nnUNetv2_predict -i "$RAW_S/imagesTs" \
  -o "$OUT/pred_specialist" -d "$S" -c 3d_fullres -tr "$TR" -p nnUNetPlans_general "${PREDICT[@]}"
step predict_merged "$OUT/pred_merged/summary.json" nnUNetv2_predict -i "$RAW_G/imagesTs" -o "$OUT/pred_merged" \
  -d "$G" -c 3d_fullres -tr "$GATE" -p nnUNetMergedPlans "${PREDICT[@]}"
for m in general specialist merged; do
  if [ "$m" = specialist ]; then RAW="$RAW_S"; MODEL="$SPECIALIST"; else RAW="$RAW_G"; MODEL="$GENERAL"; fi
  step "evaluate_$m" "$OUT/pred_$m/summary.json" nnUNetv2_evaluate_folder "$RAW/labelsTs" "$OUT/pred_$m" \
    -djfile "$RAW/dataset.json" -pfile "$MODEL/plans.json" "${NP[@]}"
done
python -m moe_nnunet.profiling.merge_bench table "$OUT/dice.json" \
  "general=$OUT/pred_general/summary.json:$RAW_G/dataset.json" \
  "specialist ($LABEL)=$OUT/pred_specialist/summary.json:$RAW_S/dataset.json" \
  "merged=$OUT/pred_merged/summary.json:$RAW_G/dataset.json" | tee "$OUT/dice.md"
