"""nnU-Net trainers shipped by moe_nnunet (found by nnU-Net through `moe_nnunet trainer_path`)."""
from moe_nnunet.trainers.compare import (nnUNetTrainer_compare, nnUNetTrainerChannelDropout_compare,
                                         nnUNetTrainerM4oE1Expert_compare, nnUNetTrainerM4oE_compare,
                                         nnUNetTrainerM4oENaiveLabels_compare)
from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
from moe_nnunet.trainers.merge import nnUNetTrainerMoEMerge, nnUNetTrainerMoEMerge_debug, nnUNetTrainerMoEMerge_demo
from moe_nnunet.trainers.modality import nnUNetTrainerChannelDropout
from moe_nnunet.trainers.two_stage import nnUNetTrainerM4oEExperts, nnUNetTrainerM4oEGate
from moe_nnunet.trainers.variants import (nnUNetTrainerChannelDropout_100epochs, nnUNetTrainerChannelDropout_debug,
                                          nnUNetTrainerChannelDropout_demo, nnUNetTrainerDebug, nnUNetTrainerDemo,
                                          nnUNetTrainerM4oE_5epochs, nnUNetTrainerM4oE_100epochs,
                                          nnUNetTrainerM4oE_debug, nnUNetTrainerM4oE_demo,
                                          nnUNetTrainerM4oEExperts_debug, nnUNetTrainerM4oEExperts_demo,
                                          nnUNetTrainerM4oEGate_debug, nnUNetTrainerM4oEGate_demo)

__all__ = ["nnUNetTrainerM4oE", "nnUNetTrainerM4oE_5epochs", "nnUNetTrainerM4oE_debug", "nnUNetTrainerM4oE_demo",
           "nnUNetTrainerM4oE_100epochs", "nnUNetTrainerDemo", "nnUNetTrainerDebug", "nnUNetTrainerChannelDropout",
           "nnUNetTrainerChannelDropout_debug", "nnUNetTrainerChannelDropout_demo", "nnUNetTrainerM4oEExperts",
           "nnUNetTrainerM4oEGate", "nnUNetTrainerM4oEExperts_debug", "nnUNetTrainerM4oEGate_debug",
           "nnUNetTrainerChannelDropout_100epochs", "nnUNetTrainerM4oEExperts_demo", "nnUNetTrainerM4oEGate_demo",
           "nnUNetTrainerMoEMerge", "nnUNetTrainerMoEMerge_debug", "nnUNetTrainerMoEMerge_demo",
           "nnUNetTrainer_compare", "nnUNetTrainerChannelDropout_compare", "nnUNetTrainerM4oE_compare",
           "nnUNetTrainerM4oE1Expert_compare", "nnUNetTrainerM4oENaiveLabels_compare"]
