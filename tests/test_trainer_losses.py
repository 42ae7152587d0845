"""LoGoNet's outputs through the loss nnU-Net's trainer builds for them: deep supervision at the scales
nnU-Net derives from the plans' strides, and nnU-Net's ignore label (sparse annotations: voxels labelled
``ignore`` in dataset.json take no part in the loss). Regions are trained end to end in
tests/test_e2e_regions.py (slow)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_logonet.network.presets import arch_kwargs_for_preset
from nnunet_logonet.network.shapes import isotropic_strides
from nnunet_logonet.training.trainer import LoGoNetTrainer

PATCH = [32, 32, 32]


def _trainer(tmp_path, monkeypatch, labels: dict) -> LoGoNetTrainer:
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    arch = {"network_class_name": "nnunet_logonet.network.logonet.LoGoNet", "_kw_requires_import": [],
            "arch_kwargs": arch_kwargs_for_preset("tiny", isotropic_strides())}
    plans = {"dataset_name": "Dataset913_Sparse", "plans_name": "LoGoNetTinyPlans", "continue_training": False,
             "configurations": {"3d_fullres": {"patch_size": PATCH, "batch_size": 2, "batch_dice": True,
                                               "architecture": arch,
                                               "data_identifier": "LoGoNetTinyPlans_3d_fullres"}}}
    return LoGoNetTrainer(plans, "3d_fullres", 0, {"labels": labels, "channel_names": {"0": "CT"}},
                          torch.device("cpu"))


def _targets(trainer: LoGoNetTrainer, target: torch.Tensor) -> list[torch.Tensor]:
    """The target at every deep-supervision scale, as nnU-Net's DownsampleSegForDSTransform gives it."""
    return [F.interpolate(target.float(), scale_factor=[float(s) for s in scale], mode="nearest-exact")
            for scale in trainer._get_deep_supervision_scales()]


def _network(trainer: LoGoNetTrainer):
    return trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                              trainer.label_manager.num_segmentation_heads, True)


def test_deep_supervision_outputs_match_the_scales_nnunet_derives_from_the_plans(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, {"background": 0, "liver": 1, "tumour": 2})
    network, loss = _network(trainer), trainer._build_loss()
    target = torch.randint(0, 3, (2, 1, *PATCH))
    outputs = network(torch.randn(2, 1, *PATCH))
    targets = _targets(trainer, target)
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[2:]) for t in targets]
    assert all(o.shape[:2] == (2, 3) for o in outputs)
    value = loss(outputs, targets)
    value.backward()
    assert torch.isfinite(value)


def test_voxels_of_the_ignore_label_take_no_part_in_the_loss(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, {"background": 0, "liver": 1, "ignore": 2})
    assert trainer.label_manager.ignore_label == 2 and trainer.label_manager.num_segmentation_heads == 2
    network, loss = _network(trainer), trainer._build_loss()
    target = torch.randint(0, 2, (2, 1, *PATCH))
    target[:, :, :16] = 2  # the upper half of every patch is not annotated
    outputs = network(torch.randn(2, 1, *PATCH))
    assert outputs[0].shape[1] == 2  # no output channel for the ignore label
    outputs[0].retain_grad()
    targets = _targets(trainer, target)
    value = loss(outputs, targets)
    value.backward()
    assert torch.isfinite(value)
    gradient = outputs[0].grad
    assert gradient[:, :, :16].abs().max() == 0  # nothing flows back from the ignored voxels
    assert gradient[:, :, 16:].abs().max() > 0
    # whatever the network predicts there, the loss stays the same
    changed = [o.detach().clone() for o in outputs]
    changed[0][:, :, :16] += 5 * torch.randn_like(changed[0][:, :, :16])
    assert loss(changed, targets).item() == pytest.approx(value.item(), rel=1e-6)
    changed[0][:, :, 16:] += 1.0 * torch.randn_like(changed[0][:, :, 16:])  # an annotated voxel does count
    assert loss(changed, targets).item() != pytest.approx(value.item(), rel=1e-3)
