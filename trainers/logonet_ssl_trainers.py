"""Thin re-export for nnU-Net's ``nnUNet_extTrainer`` lookup; the classes live in
:mod:`nnunet_logonet.training.ssl_trainer`."""

from nnunet_logonet.training.ssl_trainer import (  # noqa: F401
    LoGoNetSSLTrainer,
    LoGoNetSSLTrainer_10epochs,
    LoGoNetSSLTrainer_100epochs,
    LoGoNetSSLTrainer_demo,
    LoGoNetSSLTrainer_demoQuick,
    LoGoNetSSLTrainerCPU,
)
