"""nnU-Net trainers for the M4oE network (modality experts + gate)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
from moe_nnunet.trainers.checkpointing import AtomicCheckpoints
from moe_nnunet.trainers.modality import ModalityDropout
from moe_nnunet.trainers.partial_labels import PartialLabels
from moe_nnunet.training import (MoETrainingLoss, WarmupPolyLRScheduler, adamw_param_groups, unwrapped,
                                 allow_unused_parameters)
from moe_nnunet.training.gate_stats import GateStatistics, ValidationGateRecorder, plot_gate_history

__all__ = ["nnUNetTrainerM4oE"]


GATE_LOG_KEY = "moe_gate_weights"


class nnUNetTrainerM4oE(AtomicCheckpoints, PartialLabels, ModalityDropout, nnUNetTrainer):
    """M4oE in nnU-Net: one Swin expert per modality, a per-token gate at every scale, nnU-Net's decoder.

    Changes to nnU-Net's default trainer:
      * network: `M4oEUNet`, from `moe_nnunet plan` plans or derived from nnU-Net's own plans (same patch,
        strides and channels) when the plans name another network;
      * optimiser: AdamW (lr 1e-3, weight decay 0.05 on weights only) with a 10-epoch linear warm-up then
        nnU-Net's poly decay. The gates' routers, which start from an even split, learn at 10x the rate
        (`router_lr_factor`). On a 600-iteration 2d budget (documentation/results.md) AdamW at 3e-4 learnt
        too slowly to catch up with nnU-Net's SGD (mean Dice 0.913 against 0.976), AdamW at 1e-3 matched it
        (0.977), and nnU-Net's own SGD (1e-2, Nesterov momentum 0.99) on this network reached 0.954;
      * loss: nnU-Net's DC+CE with deep supervision, plus the routers' balance and z-losses, plus a
        curriculum (MoME, Zhang et al., MICCAI 2024): each expert first learns its own modality through a
        light head of its own (`mixture_weight` 0 at epoch 0), and the gated mixture takes over linearly
        until `curriculum_epochs` (weight 1); the expert heads are then switched off;
      * modality dropout (`ModalityDropout`, p = 0.5): a sample's dropped channels are zero-filled and their
        experts masked before the gate's softmax, so the model predicts with modalities missing
        (`moe_nnunet predict`). An expert's own loss uses only the samples whose modality it saw (and, for
        datasets combined across modalities by `moe_nnunet combine`, only the cases of its modality);
      * datasets combined across modalities (`moe_nnunet combine`): a routing loss (`routing_loss_weight`
        0.1) teaches every gate to give each case's tokens to the expert of its modality tag, so the gate
        recognises the modality from the image at inference (`ExpertGate`); when those datasets annotate
        different labels, each case learns only the labels its dataset annotates (`PartialLabels`, the
        marginal loss) and validation scores each dataset on its own labels;
      * gate statistics: each epoch's mean gate weight per expert (per scale, per label, per case modality)
        goes to the log and to `gate_weights.png` beside `progress.png`; validation writes each case's mean
        gate weights to `gate_weights_validation.json` in the fold folder.
    Everything is a function of the epoch, so `--c` resumes on the same schedule; checkpoints are written
    atomically (`AtomicCheckpoints`). With `-num_gpus N` (DDP) the network is wrapped with
    `find_unused_parameters=True`, and the gate statistics are summed over the ranks before they are logged.
    """
    supports_missing_modalities = "mask"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 0.05
        self.warmup_epochs = 10
        self.curriculum_epochs = 50
        self.routing_loss_weight = 0.1  # combined datasets: teach the gate each case's modality (ExpertGate)
        self.router_lr_factor = 10.0    # the gates' small routers start even (zero logits) and learn 10x faster
        tags = dataset_json.get("moe_nnunet") or {}
        if tags and self.configuration_manager.network_arch_class_name != M4OE_NETWORK_CLASS:
            raise RuntimeError(
                f"{self.plans_manager.dataset_name} combines datasets of different modalities (moe_nnunet "
                f"combine), so it needs one expert per modality tag, which only M4oE plans hold: run `moe_nnunet "
                f"plan -d {self.plans_manager.dataset_name}`, preprocess, and train with -p nnUNetM4oEPlans.")
        self.modality_names: list[str] = list(tags.get("modalities", []))
        self.case_modality: dict[str, str] = dict(tags.get("case_modality", {}))
        labels = None if self.label_manager.has_regions else \
            {int(v): k for k, v in dataset_json["labels"].items() if k != "ignore"}
        self.gate_stats = GateStatistics([], labels, self.modality_names)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = configuration_manager.network_arch_init_kwargs
        if configuration_manager.network_arch_class_name != M4OE_NETWORK_CLASS:
            kwargs = m4oe_arch_kwargs(configuration_manager.patch_size, kwargs, num_input_channels)
        return get_network_from_plans(M4OE_NETWORK_CLASS, kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def initialize(self):
        super().initialize()
        if self.is_ddp:  # some parameters get no gradient in some steps (see `allow_unused_parameters`)
            self.network = allow_unused_parameters(self.network)

    @property
    def moe_network(self) -> nn.Module:
        """The network without its DDP / torch.compile wrappers."""
        return unwrapped(self.network)

    def configure_optimizers(self):
        groups = adamw_param_groups(self.network, self.weight_decay,
                                    lr_factors={"encoder.gates.": self.router_lr_factor})
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr)
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs,
                                          lr_scale=self.lr_scale)
        return optimizer, scheduler

    def lr_scale(self, epoch: int) -> float:
        """Multiplies the scheduled learning rate of every group (1 here; the two-stage trainer lowers it)."""
        return 1.0

    def _build_loss(self):
        mixture = super()._build_loss()
        expert = mixture.loss if isinstance(mixture, DeepSupervisionWrapper) else mixture
        return MoETrainingLoss(mixture, expert)

    def mixture_weight(self, epoch: int) -> float:
        """0 -> experts train on their own modality only; 1 -> the gated mixture alone."""
        if self.curriculum_epochs <= 0:
            return 1.0
        return float(min(1.0, epoch / self.curriculum_epochs))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        weight = self.mixture_weight(self.current_epoch)
        self.loss.mixture_weight = weight
        self.moe_network.expert_heads_active = weight < 1
        self.print_to_log_file(f"mixture weight (expert curriculum): {weight:.3f}")
        self.gate_stats.expert_names = list(self.moe_network.expert_names)
        self.gate_stats.reset()

    def own_modality(self, keys) -> torch.Tensor | None:
        """(B, E) bool, expert e is of case b's modality tag (datasets combined across modalities), else None."""
        if not self.case_modality:
            return None
        missing = [str(k) for k in keys if str(k) not in self.case_modality]
        if missing:
            raise RuntimeError(f"cases {missing[:5]} have no modality tag in dataset.json's 'moe_nnunet' entry; "
                               f"rebuild the dataset with `moe_nnunet combine` and preprocess it again.")
        names = self.moe_network.expert_names
        return torch.tensor([[self.case_modality[str(k)] == n for n in names] for k in keys], dtype=torch.bool)

    def route_targets(self, keys) -> torch.Tensor | None:
        """(B,) long: the expert of each case's modality tag, which the gate is taught to pick (datasets
        combined across modalities), -1 where no expert has the tag; None for other datasets or when no case
        of the batch has an expert (checked here, on the host, so the gate needs no device sync)."""
        own = self.own_modality(keys)
        if own is None or self.routing_loss_weight <= 0 or not bool(own.any()):
            return None
        return torch.where(own.any(1), own.float().argmax(1), torch.full((len(keys),), -1))

    def experts_for_batch(self, keep: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """`(present, responsible)`, both (B, E) bool: the experts the gate may use for each sample (their
        channels were kept), and the samples each expert's own loss learns from (present and, across
        datasets, of the expert's modality)."""
        present = self.moe_network.experts_present_for_channels(keep)
        own = self.own_modality(keys)
        return present, present if own is None else present & own

    @staticmethod
    def gate_mask(present: torch.Tensor) -> torch.Tensor:
        """The experts the gate may use: `present`, except that a sample left with none (a case whose modality
        tag matches no expert, in stage 1) gets all of them, as at validation, instead of a softmax over
        nothing (NaN)."""
        return present | ~present.any(1, keepdim=True)

    @contextmanager
    def modalities_dropped(self, keep: torch.Tensor, batch: dict) -> Iterator[None]:
        net = self.moe_network
        keys = batch.get("keys", [])
        present, self.loss.expert_mask = self.experts_for_batch(keep, keys)
        route = self.route_targets(keys)
        if route is None:  # always a tensor in training, so that a compiled step keeps one graph
            route = torch.full((len(present),), -1, dtype=torch.long)
        net.route_weight = self.routing_loss_weight
        try:
            with net.routing(self.gate_mask(present).to(self.device, non_blocking=True),
                             route.to(self.device, non_blocking=True)):
                yield
        finally:
            self.loss.expert_mask = None
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        sample_modality = None
        if self.case_modality and self.modality_names:
            sample_modality = torch.tensor([self.modality_names.index(self.case_modality[str(k)])
                                            for k in keys])
        gate = self.loss.last_gate
        if gate:
            self.gate_stats.update(list(gate["gate_means"]), gate["gate_weights"], target, sample_modality)
        self.loss.last_gate = {}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        reduce = (lambda t: dist.all_reduce(t)) if self.is_ddp else None
        summary = self.gate_stats.summary(reduce)
        self.print_to_log_file(f"gate weights {summary['experts']} (epoch mean over scales): {summary.get('mean')}")
        for group in ("per_label", "per_modality"):
            if summary.get(group):
                self.print_to_log_file(f"gate weights {group.replace('_', ' ')} (full resolution): "
                                       f"{summary[group]}")
        history = self.logger.local_logger.my_fantastic_logging.setdefault(GATE_LOG_KEY, [])
        history.extend([None] * (self.current_epoch - len(history)))  # resumed from an older checkpoint
        self.logger.log(GATE_LOG_KEY, summary, self.current_epoch)
        if self.local_rank == 0:
            try:
                plot_gate_history(self.logger.get_value(GATE_LOG_KEY, step=None),
                                  os.path.join(self.output_folder, "gate_weights.png"))
            except Exception as e:  # a plot must never stop a training
                self.print_to_log_file(f"could not plot gate weights: {e}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        net = self.moe_network
        recorder = ValidationGateRecorder(self.network, net, net.expert_names)
        dataset_class = self.dataset_class
        self.dataset_class = recorder.wrap_dataset_class(dataset_class)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = dataset_class
            recorder.close()
        suffix = "" if not self.is_ddp else f"_rank{self.local_rank}"
        recorder.save(os.path.join(self.output_folder, f"gate_weights_validation{suffix}.json"))
