"""nnU-Net workflow steps moe_nnunet adds: cross-validation runs here or on SLURM (`cv`), and plans for one model
merged from trained nnU-Net models (`merge`)."""
