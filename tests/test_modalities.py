"""Missing modalities, two-stage training and gate statistics, through nnU-Net's stock commands on CPU."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PLANS, TINY_ID
from moe_nnunet.evaluation.model_folder import parse_model_folder_name
from moe_nnunet.networks.config import m4oe_arch_kwargs
from moe_nnunet.networks.m4oe_unet import M4oEUNet
from moe_nnunet.training import sample_modality_dropout


# ---------------------------------------------------------------- units: dropout and masking

@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_dropout_never_drops_every_modality_and_draws_every_subset(num_modalities):
    g = torch.Generator().manual_seed(0)
    keep = sample_modality_dropout(4000, num_modalities, 0.5, g)
    assert keep.any(1).all(), "a sample lost every modality"
    dropped = ~keep.all(1)
    assert 0.45 < dropped.float().mean() < 0.55
    patterns = {tuple(row.tolist()) for row in keep[dropped]}
    assert len(patterns) == 2 ** num_modalities - 2  # every non-empty proper subset occurs


def test_dropout_off_and_single_modality_keep_everything():
    assert sample_modality_dropout(50, 3, 0.0).all()
    assert sample_modality_dropout(50, 1, 1.0).all()


def _tiny_network() -> M4oEUNet:
    base = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": torch.nn.Conv3d,
            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
            "norm_op": torch.nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}
    kw = m4oe_arch_kwargs([16, 16, 16], base, 3, ["T1", "T2", "FLAIR"])
    kw["drop_path_rate"] = 0.0
    torch.manual_seed(0)
    net = M4oEUNet(3, num_classes=3, **kw)
    net.apply(net.initialize)
    for gate in net.encoder.gates:  # an uneven router, so that masking is visible
        torch.nn.init.normal_(gate.logits.weight, std=0.5)
    return net


def test_masked_experts_get_exactly_zero_weight_and_do_not_matter():
    net = _tiny_network().eval()
    x = torch.randn(2, 3, 16, 16, 16)
    present = torch.tensor([[True, False, True], [False, True, True]])
    weights = []
    hooks = [gate.register_forward_hook(lambda m, a, out: weights.append(out[1])) for gate in net.encoder.gates]
    with torch.no_grad():
        out = net(x, present)
        for h in hooks:
            h.remove()
        assert len(weights) == len(net.encoder.gates)
        for w in weights:
            assert torch.equal(w[0, 1], torch.zeros_like(w[0, 1])) and torch.equal(w[1, 0], torch.zeros_like(w[1, 0]))
            torch.testing.assert_close(w.sum(1), torch.ones_like(w.sum(1)))
        # whatever the absent channel holds, the output is the same
        y = x.clone()
        y[0, 1] = torch.randn_like(y[0, 1]) * 100
        y[1, 0] = 0
        torch.testing.assert_close(net(y, present), out)
        # the whole-batch mask used at inference gives the same result as per-sample masking
        with net.experts_present(torch.tensor([True, False, True])):
            whole = net(x)
        torch.testing.assert_close(whole, net(x, torch.tensor([[True, False, True]] * 2)))


def test_every_expert_absent_is_refused():
    net = _tiny_network().eval()
    with pytest.raises(ValueError, match="at least one modality"):
        net(torch.randn(1, 3, 16, 16, 16), torch.zeros(3, dtype=torch.bool))


# ---------------------------------------------------------------- gate statistics of a trained model

def test_gate_statistics_files(trained, planned):
    fold = trained / "fold_0"
    assert (fold / "gate_weights.png").stat().st_size > 10_000
    record = json.loads((fold / "gate_weights_validation.json").read_text())
    assert record["experts"] == ["T1", "T2", "FLAIR"]
    split = json.loads((planned / "splits_final.json").read_text())[0]
    assert set(record["cases"]) == set(split["val"])
    for case in record["cases"].values():
        assert abs(sum(case["mean"]) - 1) < 1e-3 and case["patches"] >= 1
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    history = ckpt["logging"]["moe_gate_weights"]
    assert len(history) == 2 and set(history[-1]["per_label"]) >= {"t1_blob", "t2_blob", "flair_blob"}
    log = "".join(f.read_text() for f in sorted(fold.glob("training_log_*.txt")))
    assert "gate weights per label" in log


# ---------------------------------------------------------------- moe_nnunet predict with missing channels

def _copy_cases(dataset, dest, cases):
    dest.mkdir()
    for case in cases:
        for f in (dataset / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, dest / f.name)


def _predict(env, inp, out, trainer, plans, *extra, check=True, workers="0"):
    """`moe_nnunet predict`; with the default `workers` "0" it preprocesses and exports in its own process
    (nnU-Net's `predict_from_files_sequential`), else with that many worker processes each."""
    return env.run("moe_nnunet", "predict", "-i", str(inp), "-o", str(out), "-d", str(TINY_ID), "-c", "3d_fullres",
                   "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", workers,
                   "-nps", workers, "--disable_progress_bar", *extra, check=check)


def test_predict_with_a_missing_channel_file_masks_its_expert(nnunet_env, trained, tiny_dataset, tmp_path):
    trainer = parse_model_folder_name(trained.name).trainer
    cases = ["TinyPhantom_000", "TinyPhantom_001"]
    inp = tmp_path / "in"
    _copy_cases(tiny_dataset, inp, cases)
    (inp / "TinyPhantom_001_0001.nii.gz").unlink()  # case 001 has no T2
    out = tmp_path / "out"
    proc = _predict(nnunet_env, inp, out, trainer, PLANS, workers="1")  # through nnU-Net's worker processes
    assert "1 case(s) without T2: experts masked" in proc.stdout
    ref = sitk.ReadImage(str(tiny_dataset / "imagesTr" / "TinyPhantom_001_0000.nii.gz"))
    seg = sitk.ReadImage(str(out / "TinyPhantom_001.nii.gz"))
    assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    assert (out / "TinyPhantom_000.nii.gz").is_file()
    # the same as declaring T2 missing on the complete case (predicted without worker processes)
    full = tmp_path / "full"
    _copy_cases(tiny_dataset, full, ["TinyPhantom_001"])
    _predict(nnunet_env, full, tmp_path / "declared", trainer, PLANS, "--missing", "T2")
    declared = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "declared" / "TinyPhantom_001.nii.gz")))
    assert np.array_equal(declared, sitk.GetArrayFromImage(seg))


def test_predict_refuses_unknown_channel_names(nnunet_env, trained, tiny_dataset, tmp_path):
    _copy_cases(tiny_dataset, tmp_path / "in", ["TinyPhantom_000"])
    trainer = parse_model_folder_name(trained.name).trainer
    proc = _predict(nnunet_env, tmp_path / "in", tmp_path / "out", trainer, PLANS, "--missing", "PD", check=False)
    assert proc.returncode == 1 and "--missing PD" in proc.stderr and "0001=T2" in proc.stderr


@pytest.fixture(scope="module")
def channel_dropout_model(nnunet_env, planned):
    trainer = "nnUNetTrainerChannelDropout_debug"
    nnunet_env.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu")
    return nnunet_env.results / planned.name / f"{trainer}__nnUNetPlans__3d_fullres"


def test_channel_dropout_baseline_trains_and_zero_fills(nnunet_env, channel_dropout_model, tiny_dataset, tmp_path):
    assert (channel_dropout_model / "fold_0" / "checkpoint_final.pth").is_file()
    _copy_cases(tiny_dataset, tmp_path / "in", ["TinyPhantom_002"])
    proc = _predict(nnunet_env, tmp_path / "in", tmp_path / "out", "nnUNetTrainerChannelDropout_debug",
                    "nnUNetPlans", "--missing", "FLAIR")
    assert "without FLAIR: zero-filled" in proc.stdout
    assert (tmp_path / "out" / "TinyPhantom_002.nii.gz").is_file()


def test_model_without_missing_modality_training_refuses_and_names_the_file(
        nnunet_env, channel_dropout_model, tiny_dataset, tmp_path):
    """A plain nnU-Net model (the same network at the same debug width, its checkpoint relabelled as
    nnUNetTrainerDebug's, in a results folder of its own) must not silently zero-fill."""
    results = tmp_path / "results"
    plain = results / channel_dropout_model.parent.name / "nnUNetTrainerDebug__nnUNetPlans__3d_fullres"
    shutil.copytree(channel_dropout_model, plain)
    ckpt_path = plain / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["trainer_name"] = "nnUNetTrainerDebug"
    torch.save(ckpt, ckpt_path)
    inp = tmp_path / "in"
    _copy_cases(tiny_dataset, inp, ["TinyPhantom_003"])
    (inp / "TinyPhantom_003_0002.nii.gz").unlink()
    out = tmp_path / "out"
    env, nnunet_env.env = nnunet_env.env, {**nnunet_env.env, "nnUNet_results": str(results)}
    try:
        proc = _predict(nnunet_env, inp, out, "nnUNetTrainerDebug", "nnUNetPlans", check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "TinyPhantom_003_0002.nii.gz is missing (channel FLAIR)" in proc.stderr and "--zero_fill" in proc.stderr
        assert not (out / "TinyPhantom_003.nii.gz").exists()
        _predict(nnunet_env, inp, out, "nnUNetTrainerDebug", "nnUNetPlans", "--zero_fill")
    finally:
        nnunet_env.env = env
    assert (out / "TinyPhantom_003.nii.gz").is_file()


# ---------------------------------------------------------------- two-stage training

def test_two_stage_training_chains_through_pretrained_weights(nnunet_env, planned):
    stage1, stage2 = "nnUNetTrainerM4oEExperts_debug", "nnUNetTrainerM4oEGate_debug"
    refused = nnunet_env.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "2", "-tr", stage2, "-p", PLANS,
                             "-device", "cpu", check=False)
    assert refused.returncode != 0 and "-pretrained_weights" in (refused.stdout + refused.stderr)

    # stage 1 in this process (its training is not what is tested here); stage 2 through the stock command
    experts = nnunet_env.train_in_process("2", stage1, PLANS, npz=False) / "fold_2"
    weights = experts / "checkpoint_final.pth"
    nnunet_env.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "2", "-tr", stage2, "-p", PLANS, "-device", "cpu",
                   "-pretrained_weights", str(weights))
    gate = nnunet_env.results / planned.name / f"{stage2}__{PLANS}__3d_fullres" / "fold_2"
    log = "".join(f.read_text() for f in sorted(gate.glob("training_log_*.txt")))
    assert "experts frozen" in log and "experts trained (learning-rate factor 0.1)" in log
    first = torch.load(weights, map_location="cpu", weights_only=False)["network_weights"]
    second = torch.load(gate / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    key = next(k for k in first if k.startswith("encoder.experts.") and k.endswith("weight"))
    assert not torch.equal(first[key], second[key]), "experts were not fine-tuned in the second part"
    assert (gate / "validation" / "summary.json").is_file()


def test_gate_statistics_average_per_label_and_per_case_modality():
    from moe_nnunet.training.gate_stats import GateStatistics
    stats = GateStatistics(["CT", "MRI"], {0: "background", 1: "lesion"}, ["CT", "MRI"])
    weights = torch.zeros(2, 2, 1, 2, 2)
    weights[0, 0], weights[0, 1] = 1.0, 0.0          # case 0 (a CT case): all on the CT expert
    weights[1, 0], weights[1, 1] = 0.25, 0.75        # case 1 (an MRI case)
    target = torch.zeros(2, 1, 1, 2, 2, dtype=torch.long)
    target[0, 0, 0, 0, 0] = 1                        # one lesion voxel in each case
    target[1, 0, 0, 0, 0] = 1
    stats.update([weights.mean((0, 2, 3, 4))], weights, target, torch.tensor([0, 1]))
    summary = stats.summary()
    assert summary["per_modality"] == {"CT": [1.0, 0.0], "MRI": [0.25, 0.75]}
    assert summary["per_label"]["lesion"] == [0.625, 0.375]
    assert summary["mean"] == [0.625, 0.375]


def test_routing_targets_follow_the_case_tags():
    """Combined datasets: each case's gate target is the expert of its modality tag; untagged datasets get none."""
    from types import SimpleNamespace

    from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE

    def trainer(case_modality: dict, weight: float = 0.1) -> SimpleNamespace:
        t = SimpleNamespace(case_modality=case_modality, routing_loss_weight=weight,
                            moe_network=SimpleNamespace(expert_names=["CT", "MRI"]))
        t.own_modality = lambda keys: nnUNetTrainerM4oE.own_modality(t, keys)
        return t

    tags = {"CT_a": "CT", "MRI_b": "MRI", "CT_c": "CT"}
    route = nnUNetTrainerM4oE.route_targets(trainer(tags), ["MRI_b", "CT_a", "CT_c"])
    assert route.tolist() == [1, 0, 0]
    assert nnUNetTrainerM4oE.route_targets(trainer({}), ["x"]) is None
    assert nnUNetTrainerM4oE.route_targets(trainer(tags, 0.0), ["CT_a"]) is None
    other = trainer({"PET_a": "PET", "CT_a": "CT"})                       # a tag no expert has: -1, ignored
    assert nnUNetTrainerM4oE.route_targets(other, ["PET_a", "CT_a"]).tolist() == [-1, 0]
    assert nnUNetTrainerM4oE.route_targets(other, ["PET_a"]) is None     # no case with an expert: no loss
    with pytest.raises(RuntimeError, match="moe_nnunet combine"):
        nnUNetTrainerM4oE.route_targets(trainer(tags), ["unknown_case"])


def test_stage_one_case_whose_tag_matches_no_expert_trains_finite():
    """Stage 1 routes each case to the expert of its tag; a case whose tag matches no expert would leave the
    gate a softmax over nothing (NaN, which a GradScaler would silently skip). It gets every expert in the gate
    and no expert's own loss instead, and the step's loss and gradients are finite."""
    from types import SimpleNamespace

    from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
    from moe_nnunet.training import MoETrainingLoss
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    net = _tiny_network().train()
    net.expert_names[:] = ["CT", "MRI", "PET"]
    t = SimpleNamespace(case_modality={"CT_a": "CT", "US_b": "US"}, moe_network=net)
    t.own_modality = lambda keys: nnUNetTrainerM4oE.own_modality(t, keys)
    keep = torch.tensor([[True, True, True], [True, True, True]])
    _, responsible = nnUNetTrainerM4oE.experts_for_batch(t, keep, ["CT_a", "US_b"])
    present = responsible  # stage 1 (nnUNetTrainerM4oEExperts): only the case's own expert
    assert responsible.tolist() == [[True, False, False], [False, False, False]]
    gate = nnUNetTrainerM4oE.gate_mask(present)
    assert gate.tolist() == [[True, False, False], [True, True, True]]
    inner = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
    loss_fn = MoETrainingLoss(inner, inner)
    loss_fn.mixture_weight, loss_fn.expert_mask = 0.5, responsible
    net.expert_heads_active = True
    net.decoder.deep_supervision = False
    with net.routing(gate, torch.tensor([0, -1])):
        loss = loss_fn(net(torch.randn(2, 3, 16, 16, 16)), torch.randint(0, 3, (2, 1, 16, 16, 16)).float())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
