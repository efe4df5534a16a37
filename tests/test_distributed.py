"""DDP on CPU (gloo, 2 processes): what `-num_gpus 2` relies on, without GPUs.

* the gate statistics of all ranks are summed before the epoch's means are taken;
* the M4oE network trains under DDP with the trainer's loss through the expert curriculum (the experts'
  heads reach the loss through the network's output), after it (heads unused) and with the experts frozen
  (stage 2), once the trainer has re-wrapped it with `allow_unused_parameters`; the ranks' gradients are
  averaged and frozen experts do not move.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_nnunet.training import allow_unused_parameters
from moe_nnunet.training.gate_stats import GateStatistics
from test_network import build

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int):
    """A batch per rank, different on each: scale means, full-resolution weights, labels, case modalities."""
    g = torch.Generator().manual_seed(rank)
    weights = torch.rand(2, 2, 4, 4, 4, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g)
    return [weights.mean((0, 2, 3, 4)), weights.mean((0, 2, 3, 4)) * 0 + 0.5], weights, target, \
        torch.tensor([rank % 2, 1])


def _stats() -> GateStatistics:
    return GateStatistics(["CT", "MRI"], {0: "background", 1: "a", 2: "b"}, ["CT", "MRI"])


def _gate_stats_worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        stats = _stats()
        stats.update(*_batch(rank))
        out[rank] = stats.summary(lambda t: dist.all_reduce(t))
    finally:
        dist.destroy_process_group()


def _train_worker(rank: int, port: int, out: dict) -> None:
    """The trainer's pattern under DDP: the network re-wrapped by `allow_unused_parameters`, our loss reading
    the network's training output, modality dropout masks; three phases as `nnUNetTrainerM4oE` and the
    two-stage trainer run them: the expert curriculum (heads on), after it (heads off), and stage 2's first
    half (experts frozen)."""
    from test_network import _targets
    from moe_nnunet.training import MoETrainingLoss
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        net, patch = build("3d_aniso", deep_supervision=True)
        model = allow_unused_parameters(DDP(net))  # as the trainer does after nnU-Net's DDP wrapping
        inner = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
        loss_fn = MoETrainingLoss(DeepSupervisionWrapper(inner, [0.5, 0.25, 0.0]), inner)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1 + rank)  # different data on each rank
        record = {}
        for phase in ("curriculum", "mixture", "experts_frozen"):
            net.expert_heads_active = phase == "curriculum"
            loss_fn.mixture_weight = 0.5 if phase == "curriculum" else 1.0
            net.encoder.experts.requires_grad_(phase != "experts_frozen")
            before = [p.detach().clone() for p in net.encoder.experts.parameters()]
            for step in range(2):  # DDP's errors come in the second step
                present = torch.tensor([[True, True, True], [True, rank == 0, step == 0]])
                loss_fn.expert_mask = present
                optimizer.zero_grad()
                with net.routing(present, torch.tensor([-1, -1])):
                    loss = loss_fn(model(torch.randn(2, 3, *patch)), _targets("3d_aniso", 2))
                loss.backward()
                optimizer.step()
            record[phase] = {
                "grad": net.decoder.seg_layers[-1].weight.grad.clone(),
                "weight": net.decoder.seg_layers[-1].weight.detach().clone(),
                "head_grad": [None if p.grad is None else p.grad.abs().sum().item()
                              for p in net.encoder.heads.parameters()],
                "experts_changed": any(not torch.equal(a, p) for a, p in zip(before, net.encoder.experts.parameters())),
                "loss": loss.item()}
        out[rank] = {"phases": record, "find_unused": model.find_unused_parameters}
    finally:
        dist.destroy_process_group()


def _spawn(worker) -> dict:
    out = mp.Manager().dict()
    mp.spawn(worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return dict(out)


@pytest.mark.timeout(300)
def test_gate_statistics_are_summed_over_ranks():
    results = _spawn(_gate_stats_worker)
    single = _stats()
    for rank in range(WORLD):
        single.update(*_batch(rank))
    expected = single.summary()
    assert results[0] == results[1] == expected
    # the pooled means differ from either rank's own
    own = _stats()
    own.update(*_batch(0))
    assert own.summary()["per_label"] != expected["per_label"]


@pytest.mark.timeout(300)
def test_m4oe_trains_under_ddp_through_the_curriculum_and_the_freeze():
    results = _spawn(_train_worker)
    assert results[0]["find_unused"] and results[1]["find_unused"]
    for phase in ("curriculum", "mixture", "experts_frozen"):
        r0, r1 = results[0]["phases"][phase], results[1]["phases"][phase]
        # averaged gradients, hence identical weights on both ranks
        assert torch.equal(r0["grad"], r1["grad"]) and torch.equal(r0["weight"], r1["weight"]), phase
        assert r0["loss"] == r0["loss"] and r1["loss"] == r1["loss"], phase  # finite, not NaN
    curriculum = results[0]["phases"]["curriculum"]
    assert all(g is not None and g > 0 for g in curriculum["head_grad"])  # the heads learned through DDP
    assert curriculum["experts_changed"]
    assert not results[0]["phases"]["experts_frozen"]["experts_changed"]
    assert not results[1]["phases"]["experts_frozen"]["experts_changed"]
