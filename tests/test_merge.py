"""Merging trained nnU-Net models into one MoE (`moe_nnunet merge`, nnUNetTrainerMoEMerge): SAM-Med3D-MoE's idea.

Network level (toy experts, no training): labels mapped by name into the union, per-label gate, selections,
plans through JSON and nnU-Net's builder. Through the stock programs on CPU: the session's M4oE debug model
and nnU-Net's own network on the debug schedule merged; incompatible models refused; gate training leaves
the experts bit-identical; the merged model predicts after its experts' folders are gone, also from a zip.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from conftest import BASELINE, TINY_ID

from moe_nnunet.networks.merged import MERGED_NETWORK_CLASS, MergedExpertsNet, MergedOutput, map_labels_by_name

D = str(TINY_ID)
MERGED_PLANS = "nnUNetMergedPlans"
MERGE_TRAINER = "nnUNetTrainerMoEMerge_debug"
PREDICT_FLAGS = ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]


class ConstantExpert(nn.Module):
    """A toy expert predicting the same logits at every voxel (built from plans entries like a real one)."""

    def __init__(self, input_channels: int, num_classes: int, logits: list[float], deep_supervision: bool = False):
        super().__init__()
        assert len(logits) == num_classes and not deep_supervision
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits.view(1, -1, *(1,) * (x.ndim - 2))
        return logits.expand(x.shape[0], -1, *x.shape[2:]) + 0 * x[:, :1]


GENERAL = {"background": 0, "liver": 1, "spleen": 2}
SPECIALIST = {"background": 0, "tumour": 1, "liver": 2}
UNION = {"background": 0, "liver": 1, "tumour": 2, "spleen": 3}


def toy_experts(logits=((2.0, 0.0, 0.0), (2.0, 0.0, 0.0)), labels=(GENERAL, SPECIALIST), union=UNION) -> list:
    return [{"name": f"expert_{e}", "network_class_name": f"{__name__}.ConstantExpert",
             "arch_kwargs": {"logits": list(logits[e])}, "arch_kwargs_requires_import": [], "input_channels": 2,
             "num_classes": len(labels[e]), "output_labels": map_labels_by_name(labels[e], union)}
            for e in range(len(labels))]


def toy_network(experts=None, num_classes=len(UNION), **kwargs) -> MergedExpertsNet:
    return MergedExpertsNet(2, num_classes, experts or toy_experts(), nn.Conv3d, gate_hidden=4, **kwargs)


def test_labels_are_mapped_into_the_union_by_name():
    assert map_labels_by_name(GENERAL, UNION) == [0, 1, 3]
    assert map_labels_by_name(SPECIALIST, UNION) == [0, 2, 1]
    assert map_labels_by_name({"bg": 0, "tumour": 1, "ignore": 2}, UNION) == [0, 2]
    with pytest.raises(ValueError, match="kidney"):
        map_labels_by_name({"background": 0, "kidney": 1}, UNION)


def test_merged_output_is_the_per_label_mixture_in_union_order():
    """Even gate at the start: each label mixes the experts that predict it, at the union channel of its name;
    the specialist's background counts for the share the general model calls background among the labels the
    specialist does not know (here spleen)."""
    net = toy_network().eval()
    x = torch.randn(1, 2, 4, 6, 6)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 4, 4, 6, 6)
    general = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)        # background, liver, spleen
    specialist = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)     # background, tumour, liver
    share = general[0] / (general[0] + general[2])
    merged = torch.stack([(general[0] + specialist[0] * share) / 2, (general[1] + specialist[2]) / 2,
                          specialist[1], general[2]])
    assert torch.allclose(out.exp()[0, :, 0, 0, 0], merged / merged.sum(), atol=1e-5)
    assert torch.allclose(out.exp().sum(1), torch.ones(1, 4, 6, 6), atol=1e-5)  # log-probabilities


def test_one_merged_expert_is_that_expert():
    logits = (0.5, 3.0, -1.0)
    net = toy_network(toy_experts([logits], [GENERAL], GENERAL), num_classes=3).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 2, 4, 6, 6))[0, :, 0, 0, 0]
    assert torch.allclose(out.exp(), torch.softmax(torch.tensor(logits), 0), atol=1e-5)


@pytest.mark.parametrize("selection", ["soft", "topk", "threshold"])
def test_selection_weights_and_only_the_gate_learns(selection):
    net = toy_network(toy_experts(((2.0, 0.0, 0.0), (0.0, 0.0, 2.0))), selection=selection, top_k=1,
                      threshold=0.9).train()
    with torch.no_grad():  # liver: the gate prefers the specialist, weight 0.73 (below the threshold)
        net.gate.voxel_head.bias.view(4, 2)[1] = torch.tensor([0.0, 1.0])
    x = torch.randn(2, 2, 4, 6, 6)
    weights = net.gate_weights(x, net.expert_probabilities(x))                    # (B, L, E, *S)
    assert torch.allclose(weights.sum(2), torch.ones(2, 4, 4, 6, 6))
    assert (weights[:, 2, 0] == 0).all() and (weights[:, 3, 1] == 0).all()       # experts without the label
    liver = weights[0, 1, :, 0, 0, 0]
    expected = {"soft": torch.softmax(torch.tensor([0.0, 1.0]), 0), "topk": torch.tensor([0.0, 1.0]),
                "threshold": torch.tensor([1.0, 0.0])}[selection]                  # threshold: the general model
    assert torch.allclose(liver, expected, atol=1e-6)
    net(x).logits[:, 1].mean().backward()
    assert net.gate.voxel_head.bias.grad.abs().sum() > 0                          # straight-through for hard ones
    assert all(p.grad is None and not p.requires_grad for p in net.experts.parameters())
    assert not net.experts.training and net.training


def test_plans_survive_json_and_the_stock_builder():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kwargs = json.loads(json.dumps({"experts": toy_experts(), "conv_op": "torch.nn.modules.conv.Conv3d",
                                    "gate_hidden": 4, "selection": "topk", "top_k": 1}))
    net = get_network_from_plans(MERGED_NETWORK_CLASS, kwargs, ["conv_op"], 2, 4, deep_supervision=False)
    assert isinstance(net, MergedExpertsNet) and net.expert_names == ["expert_0", "expert_1"]
    assert net.eval()(torch.randn(1, 2, 4, 6, 6)).shape == (1, 4, 4, 6, 6)
    assert net.compute_conv_feature_map_size([4, 6, 6]) > 0
    with pytest.raises(ValueError, match="nnUNetTrainerMoEMerge"):
        get_network_from_plans(MERGED_NETWORK_CLASS, kwargs, ["conv_op"], 2, 4, deep_supervision=True)


def test_compiled_training_steps_reuse_one_graph_and_eval_returns_the_logits():
    """nnU-Net compiles the network on CUDA. Training steps as the merged trainer runs them (forward, nnU-Net's
    loss through `MergedLoss`, backward, optimiser step) reuse one graph; the gate weights reach the epoch's log
    through the loss; in eval the network returns the plain logits, the same as the training output's."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch._dynamo.testing import CompileCounter

    from moe_nnunet.trainers.merge import MergedLoss

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = toy_network(toy_experts(((2.0, 0.0, 0.0), (0.0, 0.0, 2.0)))).train()
    counter = CompileCounter()
    compiled = torch.compile(net, backend=counter)
    loss = MergedLoss(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                     weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(4):
        x, target = torch.randn(2, 2, 4, 6, 6), torch.randint(0, 4, (2, 1, 4, 6, 6))
        output = compiled(x)
        assert isinstance(output, MergedOutput) and not output.gate_weights.requires_grad
        optimizer.zero_grad(set_to_none=True)
        loss(output, target).backward()
        optimizer.step()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 4 training steps"
    assert net.gate.voxel_head.bias.abs().sum() > 0                                # the steps trained the gate
    weights = loss.pop_gate_weights()                                              # (L, E), mean of the 4 steps
    assert weights.shape == (4, 2) and torch.allclose(weights.sum(1), torch.ones(4))
    assert weights[2, 0] == 0 and weights[3, 1] == 0 and loss.pop_gate_weights() is None

    x = torch.randn(1, 2, 4, 6, 6)
    with torch.no_grad():
        logits = net.eval()(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (1, 4, 4, 6, 6)
        assert torch.equal(compiled(x), logits)
        assert torch.equal(net.train()(x).logits, logits)  # frozen experts, no dropout in the gate


# ---- through nnU-Net's programs ----

@pytest.fixture(scope="module")
def experts(trained, baseline_trained, tmp_path_factory) -> list[Path]:
    """Copies of the two models' folders (plans, dataset.json, fold 0's final checkpoint), which a test may
    move away without touching the session's models."""
    root = tmp_path_factory.mktemp("experts")
    for source in (trained, baseline_trained):
        (root / source.name / "fold_0").mkdir(parents=True)
        for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
            shutil.copy(source / name, root / source.name / name)
    return [root / trained.name, root / baseline_trained.name]


@pytest.fixture(scope="module")
def merge_output(nnunet_env, experts) -> str:
    return nnunet_env.run("moe_nnunet", "merge", "-d", D, "-m", *map(str, experts), "-o", MERGED_PLANS).stdout


@pytest.fixture(scope="module")
def merged(nnunet_env, planned, merge_output) -> Path:
    """The gate's fold 0 through `moe_nnunet cv` (nnUNetv2_train --npz), as for any other model."""
    out = nnunet_env.run("moe_nnunet", "cv", "-d", D, "-tr", MERGE_TRAINER, "-p", MERGED_PLANS, "--folds", "0",
                         "-device", "cpu").stdout
    assert "3d_fullres fold 0: train" in out
    return nnunet_env.results / planned.name / f"{MERGE_TRAINER}__{MERGED_PLANS}__3d_fullres"


def test_merge_writes_plans_on_the_experts_data_and_prints_the_next_commands(planned, experts, merge_output):
    plans = json.loads((planned / f"{MERGED_PLANS}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["architecture"]["network_class_name"] == MERGED_NETWORK_CLASS
    assert config["data_identifier"] == "nnUNetPlans_3d_fullres"          # the experts' data: no preprocessing
    assert "nnUNetv2_preprocess" not in merge_output
    assert (f"nnUNetv2_train {D} 3d_fullres FOLD -tr nnUNetTrainerMoEMerge -p {MERGED_PLANS}" in merge_output
            and "nnUNetv2_predict" in merge_output)
    m4oe, plain = config["architecture"]["arch_kwargs"]["experts"]
    stock = json.loads((planned / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    # the debug experts were trained at a quarter width: merged as trained, not as their plans say
    assert plain["arch_kwargs"]["features_per_stage"] == \
        [max(8, f // 4) for f in stock["architecture"]["arch_kwargs"]["features_per_stage"]]
    assert m4oe["network_class_name"].endswith("M4oEUNet") and m4oe["output_labels"] == [0, 1, 2, 3, 4]
    assert [e["model_folder"] for e in config["merged_experts"]] == [str(p) for p in experts]


def _copy_with(expert: Path, root: Path, name: str, plans=None, labels=None) -> Path:
    """A model folder beside `expert` (plans.json and dataset.json only), with changed plans or labels."""
    folder = root / name
    folder.mkdir()
    for file, change in (("plans.json", plans), ("dataset.json", labels)):
        content = json.loads((expert / file).read_text())
        if change:
            change(content)
        (folder / file).write_text(json.dumps(content))
    return folder


def test_merge_names_every_preprocessing_difference(nnunet_env, experts, tmp_path):
    def coarser(plans):
        config = plans["configurations"]["3d_fullres"]
        config["spacing"] = [4.0, 1.0, 1.0]
        config["normalization_schemes"] = ["NoNormalization"] * 3
    other = _copy_with(experts[1], tmp_path, "nnUNetTrainerDebug__nnUNetPlansCoarse__3d_fullres", plans=coarser)
    out = nnunet_env.run("moe_nnunet", "merge", "-d", D, "-m", str(experts[0]), str(other), "-o", "Nope", check=False)
    assert out.returncode == 1 and "do not share one preprocessing" in out.stderr
    assert "spacing: [2.0, 1.0, 1.0] in" in out.stderr and f"[4.0, 1.0, 1.0] in {other.name}" in out.stderr
    assert "normalization_schemes:" in out.stderr and "use_mask_for_norm" not in out.stderr
    assert not (nnunet_env.preprocessed / "Dataset990_TinyPhantom" / "Nope.json").exists()


def test_merge_needs_the_union_of_labels_in_the_dataset(nnunet_env, experts, tmp_path):
    def kidney(dataset):
        dataset["labels"] = {"background": 0, "kidney": 1}
    other = _copy_with(experts[1], tmp_path, "nnUNetTrainerDebug__nnUNetPlans__3d_fullres", labels=kidney)
    out = nnunet_env.run("moe_nnunet", "merge", "-d", D, "-m", str(other), "-o", "Nope", check=False)
    assert out.returncode == 1 and "union of the models' labels" in out.stderr
    assert "label 'kidney' of nnUNetTrainerDebug__nnUNetPlans__3d_fullres is not a label of the dataset" in out.stderr
    assert "the dataset's label 't1_blob' is predicted by no model" in out.stderr


def test_gate_training_leaves_the_experts_bit_identical(merged, experts):
    from moe_nnunet.trainers.checkpointing import load_checkpoint_file

    # weights_only=True: the checkpoints of both experts' trainers and of the merge trainer hold nothing else
    merged_weights = load_checkpoint_file(merged / "fold_0" / "checkpoint_final.pth")["network_weights"]
    for e, expert in enumerate(experts):
        weights = load_checkpoint_file(expert / "fold_0" / "checkpoint_final.pth")["network_weights"]
        assert weights and all(torch.equal(merged_weights[f"experts.{e}.{k}"], v) for k, v in weights.items())
    assert merged_weights["gate.voxel_head.bias"].abs().sum() > 0   # the gate learned (it starts at zero)
    log = "".join(f.read_text() for f in sorted((merged / "fold_0").glob("training_log_*.txt")))
    assert "mean gate weight per label (training)" in log and "weights from" in log
    summary = json.loads((merged / "fold_0" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3", "4"}
    assert list((merged / "fold_0" / "validation").glob("*.npz"))                # --npz, for ensembling


def _segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_merged_model_predicts_without_its_experts_folders_and_from_a_zip(nnunet_env, tiny_dataset, merged,
                                                                           experts, tmp_path):
    """Exported, the experts' folders moved away, installed into an empty nnUNet_results: same segmentation."""
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((tiny_dataset / "imagesTr").glob("TinyPhantom_000_*.nii.gz")):
        shutil.copy(f, images / f.name)
    model = ["-d", D, "-c", "3d_fullres", "-tr", MERGE_TRAINER, "-p", MERGED_PLANS, "-f", "0", *PREDICT_FLAGS]
    nnunet_env.run("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "before"), *model)
    root = experts[0].parent
    root.rename(root.with_name(root.name + "_moved"))
    try:
        nnunet_env.run("nnUNetv2_export_model_to_zip", "-d", D, "-c", "3d_fullres", "-tr", MERGE_TRAINER,
                       "-p", MERGED_PLANS, "-f", "0", "-o", str(tmp_path / "merged.zip"))
        installed = tmp_path / "installed_results"
        installed.mkdir()
        env = nnunet_env.env
        nnunet_env.env = {**env, "nnUNet_results": str(installed)}
        try:
            nnunet_env.run("nnUNetv2_install_pretrained_model_from_zip", str(tmp_path / "merged.zip"))
            nnunet_env.run("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "from_zip"), *model)
        finally:
            nnunet_env.env = env
    finally:
        root.with_name(root.name + "_moved").rename(root)
    before, after = _segmentations(tmp_path / "before"), _segmentations(tmp_path / "from_zip")
    assert list(before) == list(after) == ["TinyPhantom_000.nii.gz"]
    assert np.array_equal(before["TinyPhantom_000.nii.gz"], after["TinyPhantom_000.nii.gz"])
    assert set(np.unique(after["TinyPhantom_000.nii.gz"])) <= {0, 1, 2, 3, 4}
