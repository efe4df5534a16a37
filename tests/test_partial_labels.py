"""Partial labels: datasets that annotate different labels combined into one dataset (`moe_nnunet combine`), the
marginal loss, each dataset scored on its own labels, and the stock commands end to end on a tiny combination."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

from conftest import NNUNetEnv, forked_pools
from moe_nnunet.evaluation.partial_labels import per_dataset, score_annotated_only
from moe_nnunet.training.partial_labels import marginalise_output, merge_unannotated
from test_datasets import check_integrity

COMBINED_ID = 961


def _loss(batch_dice: bool = False) -> DC_and_CE_loss:
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1)


def test_marginal_loss_is_nnunets_loss_when_every_label_is_annotated():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 1, 6, 6)).float()
    everything = torch.ones(2, 4, dtype=torch.bool)
    assert merge_unannotated(logits, everything) is logits
    torch.testing.assert_close(_loss()(merge_unannotated(logits, everything), target), _loss()(logits, target))


def test_marginal_loss_merges_unannotated_labels_into_background():
    """Sample 0 annotates labels 1 and 2, not 3: its loss is the cross-entropy and Dice of the merged distribution
    (background + label 3 as background), so moving probability between background and label 3 changes nothing,
    and label 3 gets no gradient from sample 0. Sample 1 annotates everything and is unchanged."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 3, (2, 1, 5, 5)).float()            # sample 0 has no label 3 in its annotation
    annotated = torch.tensor([[True, True, True, False], [True, True, True, True]])
    merged = merge_unannotated(logits, annotated)
    probs, merged_probs = logits.softmax(1), merged.softmax(1)
    torch.testing.assert_close(merged_probs[0, 0], probs[0, 0] + probs[0, 3])
    assert float(merged_probs[0, 3].max()) < 1e-30
    torch.testing.assert_close(merged_probs[0, 1:3], probs[0, 1:3])
    torch.testing.assert_close(merged[1], logits[1])
    # the marginal cross-entropy by hand, for sample 0
    p = merged_probs[0].gather(0, target[0].long()).log().mean().neg()
    torch.testing.assert_close(torch.nn.functional.cross_entropy(merged[:1], target[:1, 0].long()), p)

    # mass moved between background and the unannotated label (same merged probability): the same loss
    shifted = logits.clone()
    total = torch.logsumexp(logits[0, [0, 3]], dim=0)
    shifted[0, 0] = total + math.log(0.9)
    shifted[0, 3] = total + math.log(0.1)
    loss = _loss()
    torch.testing.assert_close(loss(merge_unannotated(shifted, annotated), target),
                               loss(merge_unannotated(logits, annotated), target))
    # ... which the plain loss does not ignore: it teaches label 3 as background
    assert not torch.allclose(loss(shifted, target), loss(logits, target))

    leaf = logits.clone().requires_grad_(True)
    loss(merge_unannotated(leaf, annotated), target).backward()
    grad_bg, grad_3 = leaf.grad[0, 0], leaf.grad[0, 3]
    # background and label 3 share one merged probability: the loss moves them by their share of it alone
    torch.testing.assert_close(grad_3 / probs[0, 3], grad_bg / probs[0, 0])
    assert torch.isfinite(leaf.grad).all()


def test_marginalised_outputs_of_every_shape_and_half_precision():
    annotated = torch.tensor([[True, False, True], [True, True, False]])
    deep = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    out = marginalise_output(deep, annotated)
    assert isinstance(out, list) and [o.shape for o in out] == [d.shape for d in deep]
    experts = torch.randn(2, 4, 3, 8, 8)
    moe = marginalise_output({"logits": deep, "expert_logits": experts, "aux_loss": torch.zeros(())}, annotated)
    for e in range(4):
        torch.testing.assert_close(moe["expert_logits"][:, e], merge_unannotated(experts[:, e], annotated))
    half = merge_unannotated(torch.randn(2, 3, 4, 4, dtype=torch.float16), annotated)
    assert torch.isfinite(half).all() and torch.isfinite(half.float().log_softmax(1)).all()


def test_unannotated_labels_are_not_scored():
    """A prediction of label 2 on a case whose dataset does not annotate it is no fake zero: nnU-Net's Dice 0
    there becomes NaN, the means leave it out, and each dataset's mean covers its own labels."""
    def case(name, d1, d2):
        return {"reference_file": f"/gt/{name}.nii.gz", "prediction_file": f"/p/{name}.nii.gz",
                "metrics": {"1": {"Dice": d1, "IoU": d1, "FP": 1}, "2": {"Dice": d2, "IoU": d2, "FP": 5}}}
    summary = {"metric_per_case": [case("A_0", 0.8, 0.0), case("B_0", 0.6, 0.9)],
               "mean": {"1": {"Dice": 0.7, "IoU": 0.7, "FP": 1}, "2": {"Dice": 0.45, "IoU": 0.45, "FP": 5}},
               "foreground_mean": {"Dice": 0.575, "IoU": 0.575, "FP": 3}}
    rescored = score_annotated_only(summary, {"A_0": {0, 1}, "B_0": {0, 1, 2}}, ".nii.gz")
    assert math.isnan(rescored["metric_per_case"][0]["metrics"]["2"]["Dice"])
    assert rescored["metric_per_case"][0]["metrics"]["2"]["FP"] == 5              # counts kept
    assert rescored["mean"]["2"]["Dice"] == pytest.approx(0.9) and rescored["mean"]["1"]["Dice"] == pytest.approx(0.7)
    assert rescored["foreground_mean"]["Dice"] == pytest.approx(0.8)
    datasets = per_dataset(rescored, {"A_0": "A", "B_0": "B"}, {"A": [0, 1], "B": [0, 1, 2]},
                           {1: "liver", 2: "tumour"}, ".nii.gz")
    assert datasets == {"A": {"num_cases": 1, "labels": {"liver": 0.8}, "mean": pytest.approx(0.8)},
                        "B": {"num_cases": 1, "labels": {"liver": 0.6, "tumour": 0.9}, "mean": pytest.approx(0.75)}}


# ---------------------------------------------------------------- end to end through the stock commands


@pytest.fixture(scope="module")
def combined(tmp_path_factory) -> NNUNetEnv:
    """Two single-channel phantoms whose only labels differ (a_blob, b_blob), combined and planned."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    from moe_nnunet.datasets.combine import combine_datasets
    from moe_nnunet.datasets.phantom import build_phantom, plan_phantom

    env = NNUNetEnv(tmp_path_factory.mktemp("partial_labels"))
    for dataset_id, channel in ((962, "A"), (963, "B")):
        build_phantom(env.raw, dataset_id, name=f"Only{channel}", num_cases=5, shape=(16, 32, 32),
                      spacing=(2.0, 1.0, 1.0), seed=dataset_id, channels=(channel,))
    combine_datasets([962, 963], COMBINED_ID, "PartialAB", raw_root=env.raw)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.env.items():
            if name.startswith("nnUNet_"):
                mp.setenv(name, value)
        forked_pools(mp, fingerprint_extractor, default_preprocessor)
        plan_phantom(COMBINED_ID, "3d_fullres", 1)
    return env


def test_partial_label_dataset_passes_nnunets_integrity_check(combined, capfd, monkeypatch):
    folder = combined.raw / f"Dataset{COMBINED_ID}_PartialAB"
    check_integrity(folder, capfd, monkeypatch)
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "a_blob": 1, "b_blob": 2}


def test_m4oe_trains_with_partial_labels_and_scores_each_dataset_on_its_labels(combined, tmp_path):
    trainer, plans = "nnUNetTrainerM4oE_debug", "nnUNetM4oEPlans"
    # nnU-Net's run_training in this process (the stock command line is the `trained` fixture's)
    fold = combined.train_in_process("0", trainer, plans, npz=False, dataset=COMBINED_ID) / "fold_0"
    log = "".join(f.read_text() for f in sorted(fold.glob("training_log_*.txt")))
    assert "partial labels: each case learns the labels its dataset annotates {'A': [0, 1], 'B': [0, 2]}" in log
    assert "validation Dice of" in log
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    for case in summary["metric_per_case"]:
        source = Path(case["reference_file"]).name.split("_")[0]
        unannotated = "2" if source == "A" else "1"
        assert math.isnan(case["metrics"][unannotated]["Dice"]), case   # never scored on this case
        assert not math.isnan(case["metrics"]["1" if source == "A" else "2"]["Dice"])
    per = json.loads((fold / "validation" / "summary_per_dataset.json").read_text())["datasets"]
    assert set(per) <= {"A", "B"} and per
    for source, result in per.items():
        assert list(result["labels"]) == [f"{source.lower()}_blob"] and 0 <= result["mean"] <= 1

    # the best-configuration step of `moe_nnunet cv` reads summaries scored the same way
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.postprocessing import remove_connected_components

    from moe_nnunet.workflow.cv import find_best
    with pytest.MonkeyPatch.context() as mp:
        for name, value in combined.env.items():
            if name.startswith("nnUNet_"):
                mp.setenv(name, value)
        forked_pools(mp, evaluate_predictions, remove_connected_components)
        find_best(str(COMBINED_ID), [{"trainer": trainer, "plans": plans, "configuration": "3d_fullres"}], ["0"], 1)
    crossval = fold.parent / "crossval_results_folds_0"
    assert json.loads((crossval / "summary_per_dataset.json").read_text())["datasets"] == per
    info = json.loads((fold.parent.parent / "inference_information.json").read_text())
    chosen = json.loads((crossval / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert info["best_model_or_ensemble"]["result_on_crossval_pre_pp"] == pytest.approx(chosen)
    assert chosen == pytest.approx(summary["foreground_mean"]["Dice"])  # the validation's own, rescored

    # nnUNetv2_predict: the union label map for a case of either dataset, no tag given
    images = combined.raw / f"Dataset{COMBINED_ID}_PartialAB" / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    for case in ("A_OnlyA_000", "B_OnlyB_000"):
        shutil.copy(images / f"{case}_0000.nii.gz", inp / f"{case}_0000.nii.gz")
    combined.run("nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-d", str(COMBINED_ID), "-c",
                 "3d_fullres", "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta",
                 "-npp", "1", "-nps", "1")
    for case in ("A_OnlyA_000", "B_OnlyB_000"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz")))
        assert seg.shape == (16, 32, 32) and set(np.unique(seg).tolist()) <= {0, 1, 2}
