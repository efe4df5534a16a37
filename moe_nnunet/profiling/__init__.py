"""Cost of our networks against nnU-Net's: time, FLOPs and memory of a training step (`benchmark`), peak memory
simulated on fake tensors (`memory`, also the planner's memory check), the reference networks (`references`),
and the helpers of the merged-model benchmark (`merge_bench`)."""
