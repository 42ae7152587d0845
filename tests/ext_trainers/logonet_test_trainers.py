"""Test-only trainer variants, found by nnU-Net through nnUNet_extTrainer like the real ones.
Their budgets are the ones the end-to-end tests are calibrated for, independent of the demo's."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_logonet.training.trainer import LoGoNetTrainer, with_budget

#: CI's end-to-end pass checks the workflow (resume, outputs, geometry, export), not accuracy: 4 short
#: epochs, a checkpoint after each, so that a run killed after the first one has epochs left to resume
LoGoNetTrainer_ciE2E = with_budget(LoGoNetTrainer, "LoGoNetTrainer_ciE2E", 4, 10, 2, __name__, save_every=1)

#: the learning check (tests/test_e2e_learning.py, slow): long enough for the liver to take off
LoGoNetTrainer_ciLearning = with_budget(LoGoNetTrainer, "LoGoNetTrainer_ciLearning", 30, 25, 3, __name__)

#: the MSD workflow test checks names, geometry and labels, not accuracy: one short epoch
LoGoNetTrainer_ciMSD = with_budget(LoGoNetTrainer, "LoGoNetTrainer_ciMSD", 1, 4, 1, __name__)


class LoGoNetTrainer_ciCascade(with_budget(LoGoNetTrainer, "_Budget", 1, 4, 1, __name__)):
    """The cascade test (tests/test_e2e_cascade.py, slow): one short epoch, and a validation without
    mirroring (as nnU-Net's nnUNetTrainerNoMirroring), whose 8 mirrored tiles dominated its run time."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch, None


#: the ensembling test (tests/test_e2e_ensemble.py, slow): nnU-Net's own trainer and network, one short epoch
#: as LoGoNetTrainer_ciMSD, so that the two are ranked and ensembled on the same fold
nnUNetTrainer_ciEnsemble = with_budget(nnUNetTrainer, "nnUNetTrainer_ciEnsemble", 1, 4, 1, __name__)
