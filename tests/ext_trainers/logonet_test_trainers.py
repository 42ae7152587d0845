"""Test-only trainer variants, found by nnU-Net through nnUNet_extTrainer like the real ones.
Their budget is the one the end-to-end test is calibrated for, independent of the demo's."""

from nnunet_logonet.training.trainer import LoGoNetTrainer, with_budget

LoGoNetTrainer_ciE2E = with_budget(LoGoNetTrainer, "LoGoNetTrainer_ciE2E", 30, 25, 3, __name__, save_every=1)

#: the MSD workflow test checks names, geometry and labels, not accuracy: one short epoch
LoGoNetTrainer_ciMSD = with_budget(LoGoNetTrainer, "LoGoNetTrainer_ciMSD", 1, 4, 1, __name__)
