"""nnU-Net's own trainer with the demo's CPU budgets, so the baseline and LoGoNet train for the same
number of epochs and iterations (nnU-Net ships only 250-iteration epochs), and with checkpoints
written whole (a demo killed while nnU-Net wrote one could not resume)."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_logonet.training.checkpoints import AtomicCheckpoints
from nnunet_logonet.training.trainer import DEMO_BUDGET, DEMO_QUICK_BUDGET, with_budget


class nnUNetTrainer_atomicCheckpoints(AtomicCheckpoints, nnUNetTrainer):
    """nnU-Net's trainer, unchanged but for checkpoints written to a temporary file and renamed."""


nnUNetTrainer_demo = with_budget(nnUNetTrainer_atomicCheckpoints, "nnUNetTrainer_demo", DEMO_BUDGET["epochs"],
                                 DEMO_BUDGET["iterations"], DEMO_BUDGET["val_iterations"], __name__,
                                 save_every=1)
nnUNetTrainer_demoQuick = with_budget(nnUNetTrainer_atomicCheckpoints, "nnUNetTrainer_demoQuick",
                                      DEMO_QUICK_BUDGET["epochs"], DEMO_QUICK_BUDGET["iterations"],
                                      DEMO_QUICK_BUDGET["val_iterations"], __name__, save_every=1)
