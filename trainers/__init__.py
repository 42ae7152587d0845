"""Folder that ``nnUNet_extTrainer`` points at. Each module is a thin re-export of trainer
classes that live in :mod:`nnunet_logonet.training`; nnU-Net imports these files as top-level
modules and drops them afterwards, so no real code may live here."""
