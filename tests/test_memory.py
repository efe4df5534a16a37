"""Training memory counted on fake tensors, and the planner that sizes patches with it."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_nnunet.profiling import synthetic_setup
from moe_nnunet.profiling.memory import (GIB, NNUNET_REFERENCE, LiveTensorBytes, _AsOnCuda, planner_units_to_gib,
                                         simulate_training_memory, training_memory_in_planner_units)
from conftest import TINY_ID

MIB = 2 ** 20


def test_live_bytes_counts_each_storage_once_until_freed():
    counter = LiveTensorBytes()
    with counter:
        a = torch.empty(MIB // 4)          # 1 MiB of float32
        view = a[: MIB // 8]               # a view: no new storage
        b = torch.empty(MIB // 2)          # 2 MiB
        assert counter.live == 3 * MIB
        del a, view                        # the storage goes with its last reference
        c = torch.empty(MIB // 4)
        del b, c
    assert counter.peak == 3 * MIB
    assert counter.live == 0


def _attention_peak(fused: bool) -> int:
    """Forward and backward of one windowed attention with a learned (h, N, N) bias, on fake tensors."""
    counter = LiveTensorBytes()
    with FakeTensorMode():
        q = torch.randn(64, 4, 512, 32, requires_grad=True)
        bias = torch.randn(1, 4, 512, 512, requires_grad=True)
        counter.hold([q, bias])
        with counter, (_AsOnCuda(bf16=False) if fused else torch.enable_grad()):
            F.scaled_dot_product_attention(q, q, q, attn_mask=bias).sum().backward()
    return counter.peak


def test_attention_is_counted_as_the_fused_gpu_kernel_keeps_it():
    # the whole attention matrix of the CPU fallback: 64 windows x 4 heads x 512 x 512 float32 = 256 MiB
    matrix = 64 * 4 * 512 * 512 * 4
    qkv = 64 * 4 * 512 * 32 * 4
    fused, cpu = _attention_peak(True), _attention_peak(False)
    assert cpu > matrix  # the CPU math path keeps it
    # the fused kernel keeps q, k, v, output, log-sum-exp and the bias; backward makes the bias gradient at
    # the broadcast shape (one matrix, transient) and the q/k/v gradients
    assert matrix <= fused - 4 * 512 * 512 * 4 < matrix + 8 * qkv


def test_m4oe_training_memory_grows_with_patch_and_batch_and_halves_with_bf16():
    small = synthetic_setup(channels=2, patch_size=(32, 32, 32), batch_size=1)
    one = simulate_training_memory(small.ours, [32, 32, 32], 1, bf16=False)
    two = simulate_training_memory(small.ours, [32, 32, 32], 2, bf16=False)
    longer = simulate_training_memory(small.ours, [32, 32, 64], 1, bf16=False)
    half = simulate_training_memory(small.ours, [32, 32, 32], 2, bf16=True)
    # what a step adds to the weights and optimizer state scales with the voxels of a batch: about twice for
    # twice the batch or the patch (a little less: the weights' gradients and some buffers do not scale)
    base = one.peak_bytes - one.static_bytes
    assert one.static_bytes > 0 and base > 0
    assert 1.6 < (two.peak_bytes - two.static_bytes) / base < 2.05
    assert 1.7 < (longer.peak_bytes - longer.static_bytes) / base < 2.05
    activations = two.peak_bytes - two.static_bytes
    assert 0.4 * activations < half.peak_bytes - half.static_bytes < 0.75 * activations
    assert any(k.startswith("forward: encoder.experts") for k in two.by_part)
    # nnU-Net's units, converted back, are the simulated peak at the reference batch size
    units = training_memory_in_planner_units(small.ours, [32, 32, 32])
    at_reference = simulate_training_memory(small.ours, [32, 32, 32], NNUNET_REFERENCE[3]["batch_size"],
                                            bf16=True, optimizer="adamw", curriculum=True)
    # the expert curriculum's heads and their losses are in the planner's step, and cost memory
    assert at_reference.peak_bytes > simulate_training_memory(
        small.ours, [32, 32, 32], NNUNET_REFERENCE[3]["batch_size"], bf16=True, optimizer="adamw").peak_bytes
    assert planner_units_to_gib(units, 3, NNUNET_REFERENCE[3]["batch_size"]) * GIB == \
        pytest.approx(at_reference.peak_bytes, rel=1e-9)


def test_feature_map_estimate_scales_with_the_patch_volume():
    """The network's own estimate (nnU-Net's `compute_conv_feature_map_size`, the planner's fallback) counts
    feature maps: 8 times the voxels, 8 times the count."""
    net = synthetic_setup(channels=2, patch_size=(32, 32, 32), batch_size=1).ours.build()
    small, large = (net.compute_conv_feature_map_size(p) for p in ([32, 32, 32], [64, 64, 64]))
    assert small > 0 and 7.5 < large / small < 8.5


def test_reference_values_are_nnunets():
    """`NNUNET_REFERENCE` restates the constants nnU-Net's planner sets in its constructor."""
    import inspect

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    source = inspect.getsource(ExperimentPlanner.__init__)
    for ndim, key in ((3, "3d"), (2, "2d")):
        assert f"self.UNet_reference_val_{key} = {NNUNET_REFERENCE[ndim]['value']}" in source
        assert f"self.UNet_reference_val_corresp_bs_{key} = {NNUNET_REFERENCE[ndim]['batch_size']}" in source
    assert f"self.UNet_reference_val_corresp_GB = {NNUNET_REFERENCE[3]['gb']}" in source


def test_planner_shrinks_the_patch_until_the_simulated_step_fits(nnunet_env, planned):
    """A 0.15 GB target: our planner's 3d_fullres plan is smaller than at 8 GB, and its batch-2 training step,
    simulated as the planner does, fits in 0.15 GiB."""
    from moe_nnunet.profiling import NetworkSpec

    # with moe_nnunet plan's default dataset checks, which a good dataset passes
    out = nnunet_env.run("moe_nnunet", "plan", "-d", str(TINY_ID), "-gpu_memory_target", "0.15",
                         "-overwrite_plans_name", "nnUNetM4oEPlans_small")
    assert "Checking Dataset990_TinyPhantom" in out.stdout
    default = json.loads((planned / "nnUNetM4oEPlans.json").read_text())["configurations"]["3d_fullres"]
    small = json.loads((planned / "nnUNetM4oEPlans_small.json").read_text())["configurations"]["3d_fullres"]
    assert small["architecture"]["network_class_name"].endswith("M4oEUNet")
    voxels = [int(torch.tensor(c["patch_size"]).prod()) for c in (default, small)]
    assert voxels[1] < voxels[0], (default["patch_size"], small["patch_size"])
    arch = small["architecture"]
    dataset = json.loads((planned / "dataset.json").read_text())
    spec = NetworkSpec("ours", arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                       len(dataset["channel_names"]), len(dataset["labels"]), "plans")
    peak = simulate_training_memory(spec, small["patch_size"], 2, bf16=True, optimizer="adamw",
                                    curriculum=True).peak_bytes
    assert peak <= 0.15 * GIB
