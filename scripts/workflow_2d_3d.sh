#!/usr/bin/env bash
# The 2d + 3d_fullres workflow with an M4oE trainer on the SYNTHETIC tiny phantom (10 cases, 24 x 40 x 40), on CPU:
# 5 folds of each configuration (moe_nnunet cv), then nnU-Net's own nnUNetv2_find_best_configuration over both
# configurations, predictions of both and their ensemble (nnUNetv2_ensemble). About 6 minutes on 2 cores; CI runs
# the 3d_fullres part of this (tests/test_workflow.py), this script adds the 2d configuration.
#
#   bash scripts/workflow_2d_3d.sh [OUTPUT_DIR] [TRAINER]      # defaults: workflow_2d_3d, nnUNetTrainerM4oE_debug
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="$(realpath -m "${1:-workflow_2d_3d}")"
TR="${2:-nnUNetTrainerM4oE_debug}"
rm -rf "$OUT"; mkdir -p "$OUT/in"
export nnUNet_raw="$OUT/raw" nnUNet_preprocessed="$OUT/preprocessed" nnUNet_results="$OUT/results"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}" nnUNet_extTrainer="$(moe_nnunet trainer_path)"
python -c "from moe_nnunet.datasets.phantom import build_phantom; build_phantom('$nnUNet_raw', 990, name='TinyPhantom', \
num_cases=10, shape=(24, 40, 40), spacing=(2.0, 1.0, 1.0))"
nnUNetv2_plan_and_preprocess -d 990 -c 2d 3d_fullres -np 2 --verify_dataset_integrity > "$OUT/plan_and_preprocess.log" 2>&1
moe_nnunet plan -d 990 > "$OUT/moe_nnunet_plan.log" 2>&1
# data augmentation in the training process: the tiny runs spend more time starting workers than augmenting
nnUNet_n_proc_DA=0 moe_nnunet cv -d 990 -c 2d 3d_fullres -tr "$TR" -p nnUNetM4oEPlans -device cpu --no_best \
  > "$OUT/cv.log" 2>&1
nnUNetv2_find_best_configuration 990 -c 2d 3d_fullres -tr "$TR" -p nnUNetM4oEPlans -np 1 | tee "$OUT/find_best.log"
cp "$nnUNet_raw"/Dataset990_TinyPhantom/imagesTr/TinyPhantom_000_* "$OUT/in/"
for c in 2d 3d_fullres; do
  nnUNetv2_predict -i "$OUT/in" -o "$OUT/pred_$c" -d 990 -c "$c" -tr "$TR" -p nnUNetM4oEPlans -device cpu \
    --disable_tta -npp 1 -nps 1 --save_probabilities > "$OUT/predict_$c.log" 2>&1
done
nnUNetv2_ensemble -i "$OUT/pred_2d" "$OUT/pred_3d_fullres" -o "$OUT/ensemble" -np 1
python -c "
import SimpleITK as sitk, numpy as np
for f in ('pred_2d', 'pred_3d_fullres', 'ensemble'):
    seg = sitk.GetArrayFromImage(sitk.ReadImage('$OUT/' + f + '/TinyPhantom_000.nii.gz'))
    assert seg.shape == (24, 40, 40) and set(np.unique(seg)) <= {0, 1, 2, 3, 4}, f
    print(f'{f}: {seg.shape}, labels {sorted(np.unique(seg).tolist())}')
"
