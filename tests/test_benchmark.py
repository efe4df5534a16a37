"""`moe_nnunet bench` on CPU: the synthetic comparison end to end, plans-based setups, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_nnunet.cli import main
from moe_nnunet.networks import M4OE_NETWORK_CLASS

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def test_synthetic_cpu_compares_both_networks(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--synthetic", "--channels", "2", "--patch_size", "8", "16", "16", "--batch_size", "1",
                 "--iterations", "2", "--warmup", "0", "--device", "cpu", "--peak_tflops", "0.5", "--json", str(out),
                 "--case_size", "12", "20", "24", "--case_repeats", "2", "--no_mirroring"])
    assert code == 0
    printed = capsys.readouterr().out
    # nnUNetPredictor's sliding window over one whole case per network (its CPU note kept quiet)
    assert "sliding window, whole case, median ms" in printed and "one 12x20x24 case" in printed
    assert "mirroring off" in printed and "perform_everything_on_device" not in printed
    assert "ours/baseline" in printed and "ours/resenc_m" in printed and "training step, median ms" in printed
    assert "swinunetr: skipped (SwinUNETR needs every patch axis a multiple of 32" in printed

    result = json.loads(out.read_text())
    assert result["setup"]["patch_size"] == [8, 16, 16] and result["setup"]["channels"] == 2
    assert result["setup"]["case_size"] == [12, 20, 24] and result["setup"]["mirroring"] is False
    assert "--case_size 12 20 24 --case_repeats 2 --no_mirroring" in result["command"]
    assert result["command"].startswith("moe_nnunet bench --synthetic --channels 2")
    assert result["versions"]["torch"] and result["versions"]["nnunetv2"] and result["device"]["name"]
    ours, base = result["networks"]["ours"], result["networks"]["baseline"]
    assert ours["class"] == M4OE_NETWORK_CLASS and base["class"] == PLAIN
    for net in (ours, base):
        assert len(net["train_ms_all"]) == 2 and len(net["inference_ms_all"]) == 2
        assert len(net["sliding_window_ms_all"]) == 2 and net["sliding_window_ms"] > 0
        for key in ("train_ms", "inference_ms", "train_flops", "inference_flops", "params", "planner_estimate",
                    "train_memory_mib", "inference_memory_mib"):
            assert net[key] > 0, key
        assert net["train_flops"] > 2 * net["inference_flops"]  # backward costs about twice the forward
        assert net["train_memory_mib"] >= net["inference_memory_mib"]
        # training memory on fake tensors (fp32 here), and the planner's budget for it
        assert net["simulated_train_memory_mib"] > 0 and net["planner_memory_mib"] > 0
        parts = net["simulated_train_memory_by_part_mib"]
        assert parts["held"] > 0 and sum(parts.values()) == pytest.approx(net["simulated_train_memory_mib"], rel=0.01)
    # at this tiny patch ours peaks in the forward pass (the experts' activations), the baseline in its update
    assert any(k.startswith("forward: encoder.experts") for k in ours["simulated_train_memory_by_part_mib"])
    # same decoder in both; the experts together are about one nnU-Net encoder (expert_width)
    assert ours["params"] < 1.5 * base["params"] and ours["params_by_part"]["decoder"] == base["params_by_part"]["decoder"]
    assert ours["inference_flops_by_module"]["encoder.experts.stages.0"] > 0
    for key, ratio in result["ratios"].items():
        assert ratio == pytest.approx(ours[key] / base[key]), key
    # ResEnc M over the baseline's stages: more blocks in the encoder, one conv per decoder stage
    resenc = result["networks"]["resenc_m"]
    assert resenc["class"] == RESENC and resenc["arch_kwargs"]["strides"] == base["arch_kwargs"]["strides"]
    assert resenc["arch_kwargs"]["n_blocks_per_stage"][:3] == [1, 3, 4] and resenc["train_ms"] > 0
    assert result["ratios_to"]["resenc_m"]["train_flops"] == pytest.approx(ours["train_flops"] / resenc["train_flops"])
    assert set(result["skipped"]) == {"swinunetr"}
    for net in (ours, base, resenc):  # model FLOP utilisation against the given peak of 0.5 TFLOP/s
        assert net["train_mfu"] == pytest.approx(net["train_flops"] / (net["train_ms"] * 1e-3) / 0.5e12)


def test_simulate_counts_and_sizes_without_timing(tmp_path, capsys):
    """--simulate: parameters, FLOPs and simulated memory on fake tensors, the same figures as the real run's."""
    import torch

    from moe_nnunet.profiling import synthetic_setup
    from moe_nnunet.profiling.memory import simulate_training_memory
    from moe_nnunet.profiling.runner import Runner
    out = tmp_path / "sim.json"
    argv = ["bench", "--synthetic", "--channels", "2", "--patch_size", "8", "16", "16", "--batch_size", "1",
            "--references", "none", "--simulate", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "simulated on fake tensors, nothing timed" in printed and "training step, GFLOP" in printed
    assert "median ms" not in printed and "n/a" not in printed.split("ours, by part")[0]
    result = json.loads(out.read_text())
    assert result["setup"]["simulate"] and "--simulate" in result["command"] and "--device" not in result["command"]
    setup = synthetic_setup(channels=2, patch_size=(8, 16, 16), batch_size=1)
    for spec in setup.networks:
        net, real = result["networks"][spec.name], spec.build()
        assert "train_ms" not in net and "train_memory_mib" not in net
        assert net["params"] == sum(p.numel() for p in real.parameters())
        counted = Runner(spec, (8, 16, 16), 1, False, torch.device("cpu"), False).count_flops()  # on real tensors
        assert (net["train_flops"], net["inference_flops"]) == (counted["train_flops"], counted["inference_flops"])
        simulated = simulate_training_memory(spec, (8, 16, 16), 1, bf16=False).peak_bytes
        assert net["simulated_train_memory_mib"] == pytest.approx(simulated / 2 ** 20)
    assert result["ratios"]["train_flops"] == pytest.approx(
        result["networks"]["ours"]["train_flops"] / result["networks"]["baseline"]["train_flops"])
    assert main(argv + ["--compile"]) == 2 and "--simulate times nothing" in capsys.readouterr().err

    # a variant of our network: one conv in the experts' first stage costs fewer FLOPs and less memory
    variant, ours = tmp_path / "variant.json", result["networks"]["ours"]
    convs = [1] + ours["arch_kwargs"]["n_conv_per_stage"][1:]
    assert main(argv[:-1] + [str(variant), "--ours_arch", json.dumps({"n_conv_per_stage": convs})]) == 0
    changed = json.loads(variant.read_text())["networks"]["ours"]
    assert changed["arch_kwargs"]["n_conv_per_stage"] == convs and "n_conv_per_stage" in changed["origin"]
    assert changed["train_flops"] < ours["train_flops"] and changed["params"] < ours["params"]
    assert changed["simulated_train_memory_mib"] < ours["simulated_train_memory_mib"]
    capsys.readouterr()
    assert main(argv + ["--ours_arch", '{"n_convs": 1}']) == 2
    assert "n_convs not among our network's arguments" in capsys.readouterr().err


def test_case_size_must_match_the_patch():
    from moe_nnunet.profiling import run_benchmark, synthetic_setup
    setup = synthetic_setup(channels=2, patch_size=(8, 16, 16), batch_size=1)
    with pytest.raises(ValueError, match="needs 3 positive sizes"):
        run_benchmark(setup, "cpu", case_size=(12, 20))


def test_swinunetr_reference_is_measured_with_nnunets_loss():
    """MONAI's SwinUNETR-48 as a reference (2D, 64 x 64: its smallest patch), one output, no deep supervision."""
    pytest.importorskip("monai")
    from moe_nnunet.profiling import add_references, run_benchmark, synthetic_setup
    setup = add_references(synthetic_setup(channels=1, patch_size=(64, 64), batch_size=1), ["swinunetr"])
    result = run_benchmark(setup, "cpu", iterations=1, warmup=0, measure_memory=False)
    swin = result["networks"]["swinunetr"]
    assert swin["class"] == "moe_nnunet.profiling.references.SwinUNETRForBench" and swin["planner_estimate"] is None
    assert swin["train_ms"] > 0 and swin["train_flops"] > 2 * swin["inference_flops"] > 0
    assert result["ratios_to"]["swinunetr"]["params"] == pytest.approx(
        result["networks"]["ours"]["params"] / swin["params"])


def test_references_are_skipped_or_refused_with_the_reason(monkeypatch):
    from moe_nnunet.profiling import add_references, references, synthetic_setup
    real_find_spec = references.importlib.util.find_spec
    monkeypatch.setattr(references.importlib.util, "find_spec",
                        lambda name, *a: None if name == "monai" else real_find_spec(name, *a))
    setup = add_references(synthetic_setup(channels=1, patch_size=(64, 64, 64)), ["swinunetr"])
    assert setup.references == [] and "pip install monai" in setup.skipped["swinunetr"]
    with pytest.raises(ValueError, match="resenc_m"):
        add_references(synthetic_setup(channels=1, patch_size=(64, 64, 64)), ["resenc_l"])


def _write_preprocessed(root: Path, plans_name: str) -> None:
    """A preprocessed-dataset folder holding only what the benchmark reads: dataset.json and one plans file."""
    folder = root / "Dataset991_BenchTiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    n = 3
    architecture = {
        "network_class_name": PLAIN,
        "arch_kwargs": {"n_stages": n, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"dataset_name": folder.name, "plans_name": plans_name, "configurations": {"3d_fullres": {
        "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [8, 16, 16], "spacing": [1.0, 1.0, 1.0], "batch_dice": True, "architecture": architecture}}}
    (folder / f"{plans_name}.json").write_text(json.dumps(plans))


@pytest.fixture
def preprocessed(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "preprocessed"
    root.mkdir()
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    for var in ("nnUNet_raw", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.mark.parametrize("baseline_plans", ["nnUNetPlans", "NoSuchPlans"])
def test_plans_setup_reads_channels_labels_and_baseline(preprocessed, baseline_plans):
    from moe_nnunet.profiling import plans_setup
    _write_preprocessed(preprocessed, "nnUNetPlans")
    setup = plans_setup(991, "3d_fullres", plans="nnUNetPlans", baseline_plans=baseline_plans)
    assert setup.patch_size == [8, 16, 16] and setup.batch_size == 2
    # two channels in dataset.json -> two experts named after them; background + 3 labels -> 4 outputs
    assert setup.ours.class_name == M4OE_NETWORK_CLASS and setup.ours.input_channels == 2
    assert setup.ours.arch_kwargs["expert_names"] == ["T1", "FLAIR"] and setup.ours.num_classes == 4
    assert setup.baseline.class_name == PLAIN and setup.baseline.num_classes == 4
    if baseline_plans == "nnUNetPlans":
        assert setup.baseline.origin == "nnUNetPlans.json 3d_fullres"
    else:
        assert "NoSuchPlans.json not found" in setup.baseline.origin
        assert setup.baseline.arch_kwargs["strides"] == setup.ours.arch_kwargs["strides"]


def test_plans_mode_runs_from_the_command_line(preprocessed, tmp_path):
    _write_preprocessed(preprocessed, "nnUNetPlans")
    out = tmp_path / "plans.json"
    assert main(["bench", "-d", "991", "-c", "3d_fullres", "-p", "nnUNetPlans", "--device", "cpu",
                 "--iterations", "1", "--warmup", "0", "--no_memory", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["dataset"] == "Dataset991_BenchTiny" and result["setup"]["num_classes"] == 4
    assert result["networks"]["ours"]["train_ms"] > 0 and result["networks"]["baseline"]["train_ms"] > 0
    assert "train_memory_mib" not in result["networks"]["ours"]


@pytest.mark.parametrize("write_plans, expected", [(False, "dataset 987"),
                                                   (True, "nnUNetM4oEPlans.json not found")])
def test_missing_dataset_or_plans_is_a_clear_error(preprocessed, capsys, write_plans, expected):
    dataset = "987"
    if write_plans:  # the dataset exists but has only nnU-Net's plans, not ours
        _write_preprocessed(preprocessed, "nnUNetPlans")
        dataset = "991"
    assert main(["bench", "-d", dataset, "-c", "3d_fullres", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert expected in err and "moe_nnunet bench: error" in err
    if write_plans:
        assert "moe_nnunet plan -d 991" in err and "nnUNetPlans" in err


@pytest.mark.parametrize("patch, batch", [((80, 80), 12), ((64, 64, 64), 2)], ids=["2d_80", "3d_64"])
def test_planned_experts_cost_about_one_nnunet_encoder(patch, batch):
    """The planner's expert widths (`expert_width`) keep four experts at nnU-Net's cost: training FLOPs within
    1.2x and parameters within 1.5x of PlainConvUNet on the same topology, counted on fake tensors; with one
    expert the widths are nnU-Net's."""
    from moe_nnunet.networks.config import m4oe_arch_kwargs
    from moe_nnunet.profiling import run_benchmark, synthetic_setup

    setup = synthetic_setup(channels=4, patch_size=patch, batch_size=batch)
    result = run_benchmark(setup, simulate=True)
    assert result["ratios"]["train_flops"] <= 1.2 and result["ratios"]["params"] <= 1.5, result["ratios"]
    features = setup.baseline.arch_kwargs["features_per_stage"]
    one = m4oe_arch_kwargs(list(patch), setup.baseline.arch_kwargs, 4, expert_channels=[[0, 1, 2, 3]])
    assert one["expert_features_per_stage"] == features
    # stage 0 holds nnU-Net's activations (E experts of F/E channels), every Swin stage attends in one window
    assert setup.ours.arch_kwargs["expert_features_per_stage"][0] * 4 == features[0]
    depths = setup.ours.arch_kwargs["swin_depths"]
    assert all(d in (0, 1) for d in depths) and any(depths)


def test_simulate_shows_both_phases_of_our_training_memory(tmp_path, capsys):
    """--simulate: our trainer's step (AdamW) during the expert curriculum (heads and their losses live) and after
    it, for our network only; the curriculum phase needs at least as much as the later one."""
    from moe_nnunet.profiling import synthetic_setup
    from moe_nnunet.profiling.memory import simulate_training_memory
    out = tmp_path / "phases.json"
    assert main(["bench", "--synthetic", "--channels", "2", "--patch_size", "8", "16", "16", "--batch_size", "1",
                 "--references", "none", "--simulate", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed.split("ours, by part")[0]
    rows = {line[:40].strip(): line[40:].split() for line in table.splitlines()}
    during, after = rows["simulated, curriculum phase, MiB"], rows["simulated, after the curriculum, MiB"]
    assert len(during) == 1 and len(after) == 1  # ours alone: the baseline's cell is blank, not "n/a"
    assert "our trainer's step (AdamW)" in printed and "n/a" not in table

    ours, base = (json.loads(out.read_text())["networks"][n] for n in ("ours", "baseline"))
    curriculum, later = ours["simulated_train_memory_curriculum_mib"], ours["simulated_train_memory_after_curriculum_mib"]
    assert curriculum >= later > 0
    assert not any("curriculum" in key for key in base)
    spec = synthetic_setup(channels=2, patch_size=(8, 16, 16), batch_size=1).ours
    expected = simulate_training_memory(spec, (8, 16, 16), 1, bf16=False, optimizer="adamw").peak_bytes / 2 ** 20
    assert later == pytest.approx(expected)
