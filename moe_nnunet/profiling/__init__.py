"""Cost of our networks against nnU-Net's (`moe_nnunet bench`).

What to measure: `spec` (a network as plans describe it, the networks measured together) and `setups` (from a
dataset's plans or a patch size; `references`: nnU-Net's ResEnc M and MONAI's SwinUNETR). How: `runner` (one
network's nnU-Net training step on random data), `flops` (FLOP counting), `memory` (the step's peak memory
simulated on fake tensors, also the planner's memory check) and `benchmark` (`run_benchmark`: time, FLOPs and
memory of every network); `printing` renders the result. `merge_bench` holds the helpers of the merged-model
benchmark (scripts/bench_merge.sh), `gpu_check` and `gpu_check_trainers` those of the GPU check
(scripts/gpu_check.sh).
"""
from moe_nnunet.profiling.benchmark import run_benchmark
from moe_nnunet.profiling.printing import format_report, write_json
from moe_nnunet.profiling.setups import (add_references, default_conv_unet_kwargs, override_ours, plans_setup,
                                         synthetic_setup)
from moe_nnunet.profiling.spec import BenchmarkSetup, NetworkSpec

__all__ = ["NetworkSpec", "BenchmarkSetup", "default_conv_unet_kwargs", "synthetic_setup", "plans_setup",
           "add_references", "override_ours", "run_benchmark", "format_report", "write_json"]
