"""Checkpoints are read with `torch.load(weights_only=True)`: a stock nnU-Net checkpoint loads, one holding other
pickled objects (code that would run on loading) is refused with a message saying so, also by `moe_nnunet report`
on a model folder from elsewhere."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from moe_nnunet.cli import main
from moe_nnunet.trainers.checkpointing import (UnreadableCheckpointError, UntrustedCheckpointError,
                                               load_checkpoint_file)


def stock_checkpoint(path: Path) -> None:
    """A checkpoint written by nnU-Net's own `nnUNetTrainer.save_checkpoint`, after one epoch logged as its
    trainer logs it (numpy scalars: np.float32 losses, np.float64 Dice and EMA)."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    network = nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4, affine=True))
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    network(torch.randn(1, 2, 4, 4, 4)).mean().backward()
    optimizer.step()  # momentum buffers in the optimiser state
    logger = MetaLogger(str(path.parent), resume=False)
    dice = [np.float64(0.5), np.float64(0.75)]
    for key, value in (("epoch_start_timestamps", 1.0), ("lrs", 1e-2), ("train_losses", np.mean(np.ones(3, "f4"))),
                       ("val_losses", np.mean(np.ones(3, "f4"))), ("dice_per_class_or_region", dice),
                       ("mean_fg_dice", np.nanmean(dice)), ("epoch_end_timestamps", 2.0)):
        logger.log(key, value, 0)
    trainer = SimpleNamespace(
        local_rank=0, disable_checkpointing=False, is_ddp=False, network=network, optimizer=optimizer,
        grad_scaler=torch.amp.GradScaler("cpu"), logger=logger, _best_ema=np.nanmean(dice),
        current_epoch=0, inference_allowed_mirroring_axes=(0, 1, 2),
        my_init_kwargs={"plans": {"plans_name": "nnUNetPlans", "configurations": {}}, "configuration": "3d_fullres",
                        "fold": 0, "dataset_json": {"labels": {"background": 0, "a": 1, "b": 2}},
                        "device": torch.device("cpu")})
    nnUNetTrainer.save_checkpoint(trainer, str(path))


MARKER = Path("unpickled.txt")


def touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """A pickled object whose unpickling runs code (here: writes a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return touch, (str(self.path),)


def test_stock_nnunet_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    stock_checkpoint(path)
    with pytest.raises(Exception, match="numpy"):  # what the allow-list is for
        torch.load(path, weights_only=True)
    checkpoint = load_checkpoint_file(path, map_location="cpu")
    assert checkpoint["trainer_name"] == "SimpleNamespace" and checkpoint["current_epoch"] == 1
    logging = checkpoint["logging"]
    assert logging["mean_fg_dice"] == [0.625] and isinstance(logging["mean_fg_dice"][0], np.float64)
    assert logging["dice_per_class_or_region"] == [[0.5, 0.75]] and logging["ema_fg_dice"] == [0.625]
    assert isinstance(logging["train_losses"][0], np.float32)
    assert checkpoint["init_args"]["device"] == torch.device("cpu")
    assert set(checkpoint["network_weights"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert checkpoint["optimizer_state"]["state"][0]["momentum_buffer"].shape == (4, 2, 3, 3, 3)
    assert load_checkpoint_file(path, map_location="cpu", mmap=True)["_best_ema"] == 0.625


def test_checkpoint_written_with_numpy_1_loads(tmp_path):
    """Models trained before numpy 2 name numpy's scalar `numpy.core.multiarray.scalar`."""
    path, old = tmp_path / "new.pth", tmp_path / "old.pth"
    torch.save({"network_weights": {}, "logging": {"mean_fg_dice": [np.float64(0.5)]}}, path)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(item, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(old)
    assert load_checkpoint_file(old)["logging"]["mean_fg_dice"] == [0.5]


def test_checkpoint_with_a_pickled_object_is_refused_and_not_run(tmp_path):
    path, marker = tmp_path / "checkpoint_final.pth", tmp_path / MARKER
    torch.save({"network_weights": {"w": torch.ones(2)}, "init_args": {"hook": Payload(marker)}}, path)
    with pytest.raises(UntrustedCheckpointError) as e:
        load_checkpoint_file(path, map_location="cpu")
    message = str(e.value)
    assert str(path) in message and f"{__name__}.touch" in message
    assert "beyond tensors and numbers" in message and "would run code" in message
    assert "Only load checkpoints you trust" in message and "save it again without those objects" in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what it would have done
    assert marker.exists()


def test_damaged_pickle_is_reported_as_damaged_not_as_untrusted(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({"network_weights": {}}, path)
    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[:2] + b"\xff" + data[3:] if item.filename.endswith("data.pkl") else data)
    with pytest.raises(UnreadableCheckpointError, match="truncated or corrupted. Move it aside") as e:
        load_checkpoint_file(damaged, fix="Move it aside.")
    assert not isinstance(e.value, UntrustedCheckpointError)


def test_report_refuses_a_model_folder_whose_checkpoint_holds_code(tmp_path, capsys):
    """A model folder from elsewhere: `moe_nnunet report` reads its checkpoints' training logs, and stops."""
    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0" / "validation").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    (folder / "fold_0" / "validation" / "summary.json").write_text(json.dumps({"mean": {}}))
    marker = tmp_path / MARKER
    torch.save({"network_weights": {}, "logging": {"mean_fg_dice": [Payload(marker)]}},
               folder / "fold_0" / "checkpoint_final.pth")
    assert main(["report", str(folder), "-o", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moe_nnunet report: error: checkpoint ") and "checkpoint_final.pth was not loaded" in err
    assert "would run code" in err and not marker.exists() and not (tmp_path / "report").exists()
