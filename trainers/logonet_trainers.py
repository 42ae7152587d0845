"""Thin re-export for nnU-Net's ``nnUNet_extTrainer`` lookup; the classes live in
:mod:`nnunet_logonet.training.trainer`."""

from nnunet_logonet.training.trainer import (  # noqa: F401
    LoGoNetTrainer,
    LoGoNetTrainer_1epoch,
    LoGoNetTrainer_5epochs,
    LoGoNetTrainer_10epochs,
    LoGoNetTrainer_50epochs,
    LoGoNetTrainer_100epochs,
    LoGoNetTrainer_demo,
    LoGoNetTrainer_demoQuick,
    LoGoNetTrainer_paperRecipe,
    LoGoNetTrainer_paperRecipe_1epoch,
    LoGoNetTrainer_paperRecipe_100epochs,
    LoGoNetTrainer_paperRecipe_demo,
    ULKANetTrainer,
    ULKANetTrainer_1epoch,
    ULKANetTrainer_5epochs,
    ULKANetTrainer_10epochs,
    ULKANetTrainer_100epochs,
)
from nnunet_logonet.training.baseline import nnUNetTrainer_demo, nnUNetTrainer_demoQuick  # noqa: F401,E402
