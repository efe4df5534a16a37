"""M4oEUNet on CPU: shapes, gradients, gate behaviour, router losses, plans round trip, nnU-Net contracts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
import torch.nn.functional as F
from torch import nn

from moe_nnunet.networks import M4OE_NETWORK_CLASS, ExpertGate, M4oEUNet, MoEEncoder, m4oe_arch_kwargs
from moe_nnunet.networks.swin import (SwinBlock, WindowAttention, _window_attention_mask, window_partition,
                                     window_reverse)

REQ_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


def conv_kwargs(dim: int, strides, features=(8, 16, 32, 32)) -> dict:
    """nnU-Net-style PlainConvUNet arch_kwargs (JSON form, class names as strings)."""
    n = len(strides)
    return {"n_stages": n, "features_per_stage": list(features[:n]),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": [[3] * dim] * n,
            "strides": strides, "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [1] * (n - 1),
            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


CASES = {
    "3d_aniso": ([12, 40, 24], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], 3),
    "2d": ([48, 40], [[1, 1], [2, 2], [2, 2], [2, 2]], 2),
}


def build(name: str, deep_supervision: bool, num_classes: int = 3, channels: int | None = None, **overrides
          ) -> tuple[nn.Module, list]:
    patch, strides, default_channels = CASES[name]
    channels = channels or default_channels
    kwargs = m4oe_arch_kwargs(patch, conv_kwargs(len(patch), strides), channels)
    kwargs.update(overrides)
    net = get_network_from_plans(M4OE_NETWORK_CLASS, kwargs, REQ_IMPORT, channels, num_classes,
                                 deep_supervision=deep_supervision)
    return net, patch


def train_output(net: nn.Module, x: torch.Tensor, **kwargs) -> dict:
    net.train()
    out = net(x, **kwargs)
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_output_shapes(name, deep_supervision):
    """Eval: logits exactly as nnU-Net expects (a list highest resolution first with deep supervision).
    Training: the same logits inside the output dict, plus the gate statistics."""
    torch.manual_seed(0)
    net, patch = build(name, deep_supervision)
    x = torch.randn(2, CASES[name][2], *patch)
    net.eval()
    with torch.no_grad():
        out = net(x)
    train = train_output(net, x)
    for logits in (out, train["logits"]):
        if deep_supervision:
            strides = CASES[name][1]
            assert isinstance(logits, list) and len(logits) == len(strides) - 1
            size = list(patch)
            for o, stride in zip(logits, strides):  # highest resolution first
                size = [s // k for s, k in zip(size, stride)]
                assert list(o.shape) == [2, 3, *size]
        else:
            assert list(logits.shape) == [2, 3, *patch]
            assert torch.isfinite(logits).all()
    e = CASES[name][2]
    assert train["gate_means"].shape == (len(CASES[name][1]), e)
    assert train["gate_weights"].shape == (2, e, *patch) and not train["gate_weights"].requires_grad
    assert train["expert_logits"] is None and train["aux_loss"].ndim == 0


def test_patch_not_multiple_of_window_is_padded():
    net, _ = build("3d_aniso", False, window_sizes=[[7, 7, 7]] * 4)
    net.eval()
    out = net(torch.randn(1, 3, 12, 40, 24))
    assert out.shape[2:] == (12, 40, 24) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(CASES))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    net, patch = build(name, True)
    net.expert_heads_active = True
    out = train_output(net, torch.randn(2, CASES[name][2], *patch))
    assert out["expert_logits"].shape == (2, CASES[name][2], 3, *patch)
    loss = sum(o.square().mean() for o in out["logits"]) + out["aux_loss"] + out["expert_logits"].square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def _slice_expert(batched: torch.Tensor, single: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's part of a batched parameter: the first axis that is E times the single expert's."""
    for axis, (nb, ns) in enumerate(zip(batched.shape, single.shape)):
        if nb != ns:
            return batched.narrow(axis, e * ns, ns)
    return batched


def test_batched_experts_equal_separate_experts():
    """E experts as one grouped module compute exactly what E separate single-expert encoders compute with the
    same weights (float64): conv stages, Swin stages with shifted windows, and the experts' heads."""
    from moe_nnunet.networks.experts import ExpertEncoders, ExpertHeads

    torch.manual_seed(0)
    patch, strides, channels = CASES["3d_aniso"]
    kw = m4oe_arch_kwargs(patch, conv_kwargs(3, strides), channels)
    settings = dict(features_per_stage=kw["expert_features_per_stage"], strides=strides,
                    kernel_sizes=kw["kernel_sizes"], n_conv_per_stage=kw["n_conv_per_stage"],
                    swin_depths=kw["swin_depths"], num_heads=kw["num_heads"], window_sizes=kw["window_sizes"],
                    conv_op=nn.Conv3d, conv_bias=True, norm_op=nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={})
    assert any(kw["swin_depths"]) and not all(kw["swin_depths"])
    batched = ExpertEncoders(expert_channels=[[0], [1], [2]], **settings).double().eval()
    heads = ExpertHeads(3, kw["expert_features_per_stage"], 2, nn.Conv3d).double()
    for p in [*batched.parameters(), *heads.parameters()]:
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 3, *patch, dtype=torch.float64)
    with torch.no_grad():
        features = batched(x)
        logits = heads(features)
        for e in range(3):
            single = ExpertEncoders(expert_channels=[[0]], **settings).double().eval()
            single_heads = ExpertHeads(1, kw["expert_features_per_stage"], 2, nn.Conv3d).double()
            for module, source in ((single, batched), (single_heads, heads)):
                state = source.state_dict()
                module.load_state_dict({k: _slice_expert(state[k], v, e) for k, v in module.state_dict().items()})
            own = single(x[:, e:e + 1])
            for f, o in zip(features, own):
                c = o.shape[1]
                torch.testing.assert_close(f[:, e * c:(e + 1) * c], o)
            torch.testing.assert_close(logits[:, e], single_heads(own)[:, 0])


def test_first_layout_checkpoint_is_converted_on_loading():
    """A checkpoint written with one module per expert (version 0.1, tests/data) loads into the batched network
    with a warning and predicts what it predicted then, with all modalities and with one masked."""
    saved = torch.load(Path(__file__).parent / "data" / "m4oe_v0_1_checkpoint.pth", weights_only=True)
    net = get_network_from_plans(M4OE_NETWORK_CLASS, saved["arch_kwargs"], REQ_IMPORT, 2, 3,
                                 deep_supervision=False)
    with pytest.warns(UserWarning, match="per-expert layout of moe_nnunet 0.1"):
        net.load_state_dict(saved["state_dict"])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(saved["x"]), saved["y"], atol=1e-4, rtol=1e-4)
        with net.experts_present(torch.tensor([True, False])):
            torch.testing.assert_close(net(saved["x"]), saved["y_missing_t2"], atol=1e-4, rtol=1e-4)


def gate_input(per_expert: list[torch.Tensor]) -> torch.Tensor:
    """E tensors (B, C, *S) -> the gate's (B, E*C, *S)."""
    return torch.cat(per_expert, 1)


def test_gate_weights_sum_to_one_and_respect_mask():
    torch.manual_seed(0)
    gate = ExpertGate(4, 3, nn.Conv3d, hidden=8)
    nn.init.normal_(gate.logits.weight)  # an uneven gate
    present = torch.tensor([[True, False, True], [False, False, True]])
    # identity features per expert reveal the weights: expert e contributes e-th unit vector
    unit = [torch.zeros(2, 4, 3, 5, 6) for _ in range(3)]
    for e in range(3):
        unit[e][:, e] = 1.0
    fused, weights, _ = gate(gate_input(unit), present)
    torch.testing.assert_close(fused[:, :3], weights)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 3, 5, 6))
    assert (weights[0, 1] == 0).all() and (weights[1, :2] == 0).all() and (weights[1, 2] == 1).all()


def test_gate_is_a_router_over_the_concatenated_features():
    """The 1x1 router over all experts' concatenated features (absent experts zeroed, their weight 0),
    followed by a softmax over experts and the weighted sum."""
    torch.manual_seed(0)
    gate = ExpertGate(4, 3, nn.Conv3d, hidden=8).double()
    nn.init.normal_(gate.logits.weight)
    features = [torch.randn(2, 4, 3, 5, 6, dtype=torch.float64) for _ in range(3)]
    present = torch.tensor([[True, False, True], [True, True, True]])
    mask = present.view(2, 3, 1, 1, 1)
    concatenated = torch.cat([f * mask[:, e:e + 1] for e, f in enumerate(features)], dim=1)
    logits = gate.logits(F.gelu(gate.hidden(concatenated))).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    expected = sum(weights[:, e:e + 1] * features[e] for e in range(3))
    torch.testing.assert_close(gate(gate_input(features), present)[0], expected)
    torch.testing.assert_close(gate(gate_input(features))[0], sum(torch.softmax(gate.logits(F.gelu(gate.hidden(
        torch.cat(features, 1)))), 1)[:, e:e + 1] * features[e] for e in range(3)))


def test_routing_loss_teaches_the_gate_each_samples_expert():
    """Two modalities whose features differ in content: with the routing loss alone the gate learns to give
    each sample's tokens to the expert of its tag, and it then routes by content, with no tag (eval)."""
    torch.manual_seed(0)
    gate = ExpertGate(2, 2, nn.Conv3d, hidden=8, balance_loss_weight=0.0, z_loss_weight=0.0)
    gate.reset_router()
    x = torch.randn(4, 1, 3, 4, 4)
    x[:2] += 2.0                                                  # samples 0, 1 look different (e.g. CT)
    features = gate_input([torch.cat([x, x], 1), torch.cat([x, -x], 1)])  # what each expert makes of them
    target = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(200):
        _, _, logits = gate(features)
        loss = gate.router_losses(logits, route_target=target, route_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        per_sample = gate(features)[1].mean(dim=(2, 3, 4))        # (B, E)
    assert (per_sample[torch.arange(4), target] > 0.7).all(), per_sample        # even split: 0.5
    # samples without a tag (-1) add nothing: the routing loss is that of the tagged samples alone
    _, _, logits = gate(features)
    partial = gate.router_losses(logits, route_target=torch.tensor([0, -1, -1, 1]), route_weight=1.0)
    _, _, logits = gate(features[[0, 3]])
    torch.testing.assert_close(partial, gate.router_losses(logits, route_target=torch.tensor([0, 1]),
                                                           route_weight=1.0))
    assert partial.item() > 0
    # no sample tagged: zero, not NaN
    none = gate.router_losses(logits, route_target=torch.tensor([-1, -1]), route_weight=1.0)
    assert none.item() == 0


def test_top_k_keeps_k_experts():
    torch.manual_seed(0)
    gate = ExpertGate(4, 4, nn.Conv2d, hidden=8, top_k=2)
    nn.init.normal_(gate.logits.weight)
    unit = [torch.zeros(1, 4, 6, 6) for _ in range(4)]
    for e in range(4):
        unit[e][:, e] = 1.0
    _, weights, _ = gate(gate_input(unit))
    assert ((weights > 0).sum(1) == 2).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(1, 6, 6))


def test_bad_top_k_is_a_clear_error():
    with pytest.raises(ValueError, match="gate_top_k"):
        ExpertGate(4, 2, nn.Conv2d, top_k=3)


def test_auxiliary_losses_positive_in_training_absent_in_eval():
    net, patch = build("2d", True)
    x = torch.randn(2, 2, *patch)
    assert train_output(net, x)["aux_loss"].item() > 0
    net.eval()
    with torch.no_grad():
        assert isinstance(net(x), list)  # plain logits: nothing else leaves forward in eval


def test_absent_expert_does_not_change_the_output():
    """With channel 1's expert masked, whatever that channel holds cannot reach the prediction, and the gate
    gives that expert zero weight."""
    torch.manual_seed(0)
    net, patch = build("2d", False)
    net.eval()
    x = torch.randn(1, 2, *patch)
    y = x.clone()
    y[:, 1] = torch.randn_like(y[:, 1]) * 10
    present = torch.tensor([[True, False]])
    with torch.no_grad():
        torch.testing.assert_close(net(x, present), net(y, present))
        assert not torch.allclose(net(x), net(y))
    out = train_output(net, x, present=present)
    assert (out["gate_weights"][:, 1] == 0).all() and (out["gate_means"][:, 1] == 0).all()


# the absent experts of a batch: (configuration, experts, absent, gate_top_k). With top-k and at most k experts
# present, the masked gate still renormalises its weights (in float32, the router's precision) while the narrowed
# gate has nothing to drop, so the two agree only to float32 rounding: top-k is tested with more than k present.
SKIPPING = [("3d_aniso", 3, [1], None), ("3d_aniso", 3, [0, 2], None), ("2d", 4, [2], 2), ("2d", 4, [0, 3], None)]


def _uneven_network(name: str, experts: int, **overrides) -> tuple[M4oEUNet, list]:
    """A float64 network in eval whose gates are far from even, so that every expert's weight matters."""
    torch.manual_seed(0)
    net, patch = build(name, True, channels=experts, drop_path_rate=0.0, **overrides)
    for p in net.encoder.gates.parameters():
        nn.init.normal_(p, std=0.5)
    return net.double().eval(), patch


def _masked_and_skipping(net: M4oEUNet, x: torch.Tensor, present: torch.Tensor) -> tuple[list, list]:
    """Eval outputs with the absent experts computed and masked, and with them skipped."""
    with torch.no_grad():
        net.skip_absent_experts = False
        masked = net(x, present)
        net.skip_absent_experts = True
        with net.experts_present(present):
            return masked, net(x)


@pytest.mark.parametrize("name,experts,absent,top_k", SKIPPING)
def test_skipping_absent_experts_equals_masking_them(name, experts, absent, top_k):
    """In eval, experts absent from the whole batch (one mask, (E,) or (B, E) with equal rows, as the predictor
    sets it) are not computed; the logits and the recorded gate means are those of the masked full network."""
    net, patch = _uneven_network(name, experts, gate_top_k=top_k)
    x = torch.randn(2, experts, *patch, dtype=torch.float64)
    present = torch.ones(experts, dtype=torch.bool)
    present[absent] = False
    kept = tuple(e for e in range(experts) if e not in absent)
    net.record_gate_means = True
    masked, skipping = _masked_and_skipping(net, x, present)
    skipping_means = net.last_gate_means
    for m, s in zip(masked, skipping):
        torch.testing.assert_close(s, m, rtol=0, atol=1e-10)
    subset = net.expert_subset(kept)
    assert subset.experts.stages[0].blocks[0].groups == subset.gates[0].num_experts == len(kept)
    with torch.no_grad():
        for out, s in zip(net(x, present.expand(2, -1)), skipping):  # (B, E) with equal rows
            torch.testing.assert_close(out, s, rtol=0, atol=0)
        net.skip_absent_experts = False
        net(x, present)
    assert skipping_means.shape == (len(CASES[name][1]), experts) and (skipping_means[:, absent] == 0).all()
    torch.testing.assert_close(skipping_means, net.last_gate_means, rtol=0, atol=1e-10)


def test_concat_fusion_passes_every_experts_features_and_skips_like_masking():
    """gate_fusion="concat": an even gate hands the decoder's lift every expert's features unchanged, side by
    side, with every expert present or one absent (weights times the number present); skipping an absent expert
    equals masking it; every parameter learns."""
    net, patch = _uneven_network("2d", 4, gate_fusion="concat")
    x = torch.randn(2, 4, *patch, dtype=torch.float64)
    present = torch.tensor([True, False, True, True])
    masked, skipping = _masked_and_skipping(net, x, present)
    for m, s in zip(masked, skipping):
        torch.testing.assert_close(s, m, rtol=0, atol=1e-10)
    gate, features = net.encoder.gates[1], net.encoder.experts(x)[1]
    gate.reset_router()
    for mask in (None, present.expand(2, -1)):
        fused, weights, _ = gate(features, mask)
        expected = features if mask is None else (features.view(2, 4, -1, *features.shape[2:]) *
                                                  mask.view(2, 4, 1, 1, 1)).view(features.shape)
        torch.testing.assert_close(fused, expected)
    assert net.encoder.lifts[0].in_channels == 4 * net.encoder.gates[0].hidden.in_channels // 4
    torch.manual_seed(0)
    net, patch = build("2d", True, channels=4, gate_fusion="concat")
    out = train_output(net, torch.randn(2, 4, *patch))
    (sum(o.square().mean() for o in out["logits"]) + out["aux_loss"]).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None and not n.startswith("encoder.heads.")]
    assert not missing, missing
    with pytest.raises(ValueError, match="gate_fusion='mean'"):
        build("2d", True, channels=4, gate_fusion="mean")


def _expert_slices(net: M4oEUNet, e: int) -> list[torch.Tensor]:
    """Views of every encoder weight that belongs to expert e alone, in the batched experts' layout: blocks of
    1/E along the output channels (grouped convs, norms) or the leading expert axis (Swin projections and
    norms), along the heads of the bias tables, along the input channels of the routers' hidden layers."""
    hidden = {gate.hidden for gate in net.encoder.gates}
    views = []
    for module in [*net.encoder.experts.modules(), *net.encoder.gates.modules()]:
        axis = 1 if isinstance(module, WindowAttention) or module in hidden else 0
        for name, p in module.named_parameters(recurse=False):
            if not (module in hidden and name == "bias"):  # shared by all experts
                width = p.shape[axis] // net.num_experts
                views.append(p.narrow(axis, e * width, width))
    return views


def test_skipped_experts_weights_and_channel_are_not_read():
    """NaN in an absent expert's weights and in its input channel: masking computes the expert and is NaN,
    skipping never reads them and gives the masked network's logits from before the NaNs."""
    net, patch = _uneven_network("3d_aniso", 3)
    x = torch.randn(2, 3, *patch, dtype=torch.float64)
    present = torch.tensor([True, False, True])
    reference, _ = _masked_and_skipping(net, x, present)
    views = _expert_slices(net, 1)
    expert_axis = [p for m in (net.encoder.experts, net.encoder.gates) for n, p in m.named_parameters()
                   if not n.endswith("hidden.bias")]
    assert 3 * sum(v.numel() for v in views) == sum(p.numel() for p in expert_axis)  # a third of every weight
    with torch.no_grad():
        for view in views:
            view.fill_(float("nan"))
    x[:, 1] = float("nan")
    masked, skipping = _masked_and_skipping(net, x, present)
    assert all(torch.isnan(m).any() for m in masked)
    for r, s in zip(reference, skipping):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-10)


def test_expert_subsets_are_cached_and_dropped_when_weights_may_change(monkeypatch):
    """The narrowed encoder is built once per set of present experts and reused, never for training, a batch
    whose samples differ, or a forward that needs gradients; `train()`, `load_state_dict`, a dtype change and
    an in-place weight change drop it. It is no part of the network's parameters or checkpoint."""
    built = []
    select = MoEEncoder.select_experts
    monkeypatch.setattr(MoEEncoder, "select_experts", lambda self, kept: built.append(kept) or select(self, kept))
    net, patch = _uneven_network("2d", 3)
    keys, n_params = set(net.state_dict()), len(list(net.parameters()))
    x = torch.randn(2, 3, *patch, dtype=torch.float64)
    first, second = torch.tensor([True, False, True]), torch.tensor([False, True, True])

    def run(present, grad=False):
        with torch.set_grad_enabled(grad):
            return net(x.to(net.decoder.seg_layers[0].weight.dtype), present)

    run(first), run(first), run(second), run(first)
    assert built == [(0, 2), (1, 2)]
    run(torch.tensor([[True, False, True], [True, True, False]])), run(first, grad=True)  # full network
    net.train()
    train_output(net, x, present=first.expand(2, -1))
    net.eval()
    run(first)
    net.load_state_dict(net.state_dict())
    reference = run(first)
    with torch.no_grad():
        net.encoder.gates[1].logits.weight.mul_(2)
    changed = run(first)
    assert not torch.allclose(changed[0], reference[0])
    torch.testing.assert_close(changed, _masked_and_skipping(net, x, first)[0], rtol=0, atol=1e-10)
    net.float()
    assert run(first)[0].dtype == torch.float32
    assert built == [(0, 2), (1, 2)] + [(0, 2)] * 4, built
    assert set(net.state_dict()) == keys and len(list(net.parameters())) == n_params


def test_plans_survive_json_and_stock_builder_makes_the_same_network():
    patch, strides, channels = CASES["3d_aniso"]
    kwargs = m4oe_arch_kwargs(patch, conv_kwargs(3, strides), channels, ["T1", "T2", "FLAIR"])
    restored = json.loads(json.dumps(kwargs))
    assert restored == kwargs
    a = get_network_from_plans(M4OE_NETWORK_CLASS, restored, REQ_IMPORT, channels, 2, deep_supervision=True)
    direct = dict(kwargs, conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    b = M4oEUNet(channels, num_classes=2, deep_supervision=True, **direct)
    assert a.expert_names == ["T1", "T2", "FLAIR"]
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_deep_supervision_checkpoint_loads_into_inference_build():
    train_net, patch = build("3d_aniso", True)
    infer_net, _ = build("3d_aniso", False)
    infer_net.load_state_dict(train_net.state_dict(), strict=True)
    infer_net.eval()
    train_net.eval()
    train_net.decoder.deep_supervision = False  # how nnU-Net switches it off for validation
    x = torch.randn(1, 3, *patch)
    with torch.no_grad():
        torch.testing.assert_close(infer_net(x), train_net(x))


def test_memory_estimate_grows_with_patch():
    net, _ = build("3d_aniso", True)
    small = net.compute_conv_feature_map_size([12, 40, 24])
    large = net.compute_conv_feature_map_size([24, 80, 48])
    assert 7.5 < large / small < 8.5  # activations scale with the voxels (8x)


def test_invalid_plans_give_clear_errors():
    patch, strides, channels = CASES["2d"]
    kwargs = m4oe_arch_kwargs(patch, conv_kwargs(2, strides), channels)
    with pytest.raises(ValueError, match="expert_channels"):
        get_network_from_plans(M4OE_NETWORK_CLASS, dict(kwargs, expert_channels=[[0], [5]]), REQ_IMPORT,
                               channels, 2)
    with pytest.raises(ValueError, match="swin_depths"):
        get_network_from_plans(M4OE_NETWORK_CLASS, dict(kwargs, swin_depths=[0, 2]), REQ_IMPORT, channels, 2)


def test_window_partition_round_trip_and_mask():
    x = torch.randn(2, 6, 8, 4, 5)
    w = window_partition(x, (3, 4, 2))
    assert w.shape == (2, 2 * 2 * 2, 24, 5)
    torch.testing.assert_close(window_reverse(w, (3, 4, 2), (6, 8, 4)), x)
    # a 5-long axis padded to 6 with window 3, shifted by 1: real tokens never see the padding token
    mask = _window_attention_mask((5,), (6,), (3,), (1,), torch.device("cpu"))
    padded_index_after_roll = (5 - 1) % 6
    rows = window_partition(torch.arange(6).view(1, 6, 1), (3,))[0, :, :, 0]
    for win in range(mask.shape[0]):
        for i, pos in enumerate(rows[win].tolist()):
            for j, other in enumerate(rows[win].tolist()):
                if pos != padded_index_after_roll and other == padded_index_after_roll:
                    assert not mask[win, i, j]
            assert mask[win, i, i]


@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_is_softmax_of_scores_plus_bias(masked):
    """The SDPA path (each expert's heads side by side, bias broadcast over windows, or combined with a
    per-window mask) computes softmax(q k^T / sqrt(d) + bias + mask) v window by window and expert by expert,
    and the bias table gets the gradient."""
    torch.manual_seed(0)
    e, h, c = 2, 2, 8
    attn = WindowAttention(c, h, (2, 3, 2), num_experts=e).double()
    nn.init.normal_(attn.relative_position_bias_table)
    window, (b, nw, n) = (2, 3, 2), (2, 3, 12)
    x = torch.randn(e * b, nw, n, c, dtype=torch.double)
    mask = torch.rand(nw, n, n) > 0.3 if masked else None
    if mask is not None:
        mask |= torch.eye(n, dtype=torch.bool)                          # every token sees itself
    out = attn(x, window, mask)
    table = attn.relative_position_bias_table[attn.relative_position_index].view(n, n, e, h)
    for expert in range(e):
        xe = x[expert * b:(expert + 1) * b]
        qkv = xe @ attn.qkv.weight[expert] + attn.qkv.bias[expert]
        q, k, v = qkv.view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)   # (B, nW, h, N, hd)
        scores = q @ k.transpose(-1, -2) / 2.0 + table[:, :, expert].permute(2, 0, 1)
        if mask is not None:
            scores = scores.masked_fill(~mask[None, :, None], float("-inf"))
        merged = (scores.softmax(-1) @ v).transpose(2, 3).reshape(b, nw, n, c)
        reference = merged @ attn.proj.weight[expert] + attn.proj.bias[expert]
        torch.testing.assert_close(out[expert * b:(expert + 1) * b], reference)
    out.square().sum().backward()
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


def test_shift_is_disabled_when_the_window_covers_the_map():
    """A feature map no larger than the window: shifting is disabled and the block is plain attention."""
    torch.manual_seed(0)
    block = SwinBlock(8, 2, (4, 4), shift=True)
    x = torch.randn(1, 4, 4, 8)
    y = block(x)
    z = SwinBlock(8, 2, (4, 4), shift=False)
    z.load_state_dict(block.state_dict())
    torch.testing.assert_close(y, z(x))


def _training_step(model, net, x, target, present, route, optimizer, scaler=None, dtype=None):
    """One step as nnU-Net's `train_step` with our loss: forward under the trainer's routing context, loss,
    backward (scaled with a GradScaler), clip, step."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from moe_nnunet.training import MoETrainingLoss

    inner = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
    n = len(target)
    loss_fn = MoETrainingLoss(DeepSupervisionWrapper(inner, [1 / 2 ** i for i in range(n - 1)] + [0]), inner)
    loss_fn.mixture_weight = 0.5
    loss_fn.expert_mask = present
    optimizer.zero_grad(set_to_none=True)
    with net.routing(present, route), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(model(x), target)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def _targets(name: str, batch: int) -> list[torch.Tensor]:
    patch, strides, _ = CASES[name]
    size, out = list(patch), []
    for stride in strides[:-1]:
        size = [s // k for s, k in zip(size, stride)]
        out.append(torch.randint(0, 3, (batch, 1, *size)).float())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_training_steps_make_one_graph(name):
    """nnU-Net compiles the network on CUDA: several training steps with changing expert masks and routing
    targets, the expert heads on (conv and Swin stages, shifted windows, gates, heads), are one graph with no
    break and no recompile; eval adds one more."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    net, patch = build(name, True)
    e = CASES[name][2]
    net.expert_heads_active = True
    net.route_weight = 0.1
    counter = CompileCounter()
    model = torch.compile(net, backend=counter, fullgraph=True)
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(2, e, *patch)
    for step in range(3):
        present = torch.ones(2, e, dtype=torch.bool)
        present[step % 2, step % e] = False
        route = torch.tensor([step % e, -1])
        net.train()
        _training_step(model, net, x, _targets(name, 2), present, route, optimizer)
    assert counter.frame_count == 1, counter.frame_count
    net.eval()
    with torch.no_grad():
        model(x)
        model(x)
    assert counter.frame_count == 2


@pytest.mark.parametrize("name", list(CASES))
def test_fp16_autocast_with_grad_scaler_trains(name):
    """nnU-Net's CUDA default, float16 autocast with a GradScaler, stood in for by CPU autocast: gradients
    stay finite, the scale does not collapse (no skipped steps), and the loss goes down."""
    torch.manual_seed(0)
    net, patch = build(name, True)
    e = CASES[name][2]
    net.expert_heads_active = True
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    optimizer = torch.optim.AdamW(net.parameters(), 3e-3)
    x = torch.randn(2, e, *patch)
    target = _targets(name, 2)
    present = torch.tensor([[True] * e, [True] + [False] * (e - 1)])
    losses = []
    for _ in range(6):
        net.train()
        losses.append(_training_step(net, net, x, target, present, torch.tensor([-1, -1]), optimizer, scaler,
                                     torch.float16).item())
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads)
    assert scaler.get_scale() >= 2.0 ** 12, scaler.get_scale()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_router_learning_rate_factor_and_parameter_groups():
    """Every trainable parameter in exactly one AdamW group; the gates' at `lr_factor` times the scheduled rate;
    no weight decay on biases and norms."""
    from moe_nnunet.training import WarmupPolyLRScheduler, adamw_param_groups

    net, _ = build("3d_aniso", deep_supervision=True)
    groups = adamw_param_groups(net, 0.05, lr_factors={"encoder.gates.": 10.0})
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in net.parameters() if p.requires_grad)
    gate_ids = {id(p) for p in net.encoder.gates.parameters()}
    for g in groups:
        assert {id(p) in gate_ids for p in g["params"]} == {g["lr_factor"] == 10.0}
        assert all(p.ndim > 1 for p in g["params"]) == (g["weight_decay"] == 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = WarmupPolyLRScheduler(optimizer, 1e-3, max_steps=10, warmup_steps=0)
    scheduler.step(0)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1e-3, 1e-2])
