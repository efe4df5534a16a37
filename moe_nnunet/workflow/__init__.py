"""nnU-Net workflow steps moe_nnunet adds: cross-validation runs here or on SLURM (`cv`), plans for one model
merged from trained nnU-Net models (`merge`), and the step runner of `moe_nnunet compare` and `moe_nnunet demo`
(`steps`)."""
