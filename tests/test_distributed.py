"""DDP on CPU (gloo, 2 processes): what `-num_gpus 2` relies on, without GPUs.

* the gate statistics of all ranks are summed before the epoch's means are taken;
* the M4oE network trains under DDP while some parameters get no gradient (the experts' heads after the
  curriculum), once the trainer has re-wrapped it with `allow_unused_parameters`, and the ranks' gradients
  are averaged.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_nnunet.gate_stats import GateStatistics
from moe_nnunet.training import allow_unused_parameters
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
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        net, patch = build("3d_aniso", deep_supervision=False)
        net.encoder.expert_heads_active = False  # after the curriculum: the heads get no gradient
        model = allow_unused_parameters(DDP(net))  # as the trainer does after nnU-Net's DDP wrapping
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        torch.manual_seed(1 + rank)  # different data on each rank
        for _ in range(2):  # DDP's unused-parameter error would come in the second step
            optimizer.zero_grad()
            model(torch.randn(1, 3, *patch)).square().mean().backward()
            optimizer.step()
        out[rank] = {"grad": net.decoder.seg_layers[-1].weight.grad.clone(),
                     "head_grad": [p.grad for p in net.encoder.heads.parameters()],
                     "weight": net.decoder.seg_layers[-1].weight.detach().clone(),
                     "find_unused": model.find_unused_parameters}
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
def test_m4oe_trains_under_ddp_with_unused_parameters():
    results = _spawn(_train_worker)
    assert results[0]["find_unused"] and results[1]["find_unused"]
    # averaged gradients, hence identical weights on both ranks
    assert torch.equal(results[0]["grad"], results[1]["grad"])
    assert torch.equal(results[0]["weight"], results[1]["weight"])
    assert all(g is None for g in results[0]["head_grad"])
