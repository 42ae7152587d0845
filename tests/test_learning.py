"""The network can learn: LoGoNet-tiny fits one phantom batch with nnU-Net's loss and optimizer.

Guards against the failure docs/training_recipe.md describes (a full-resolution path too narrow
to leave the all-background solution), which no shape or parameter test can see.
"""

import torch

from nnunet_logonet.benchmark.overfit import overfit, phantom_batch


def test_phantom_batch_is_normalised_and_labelled():
    x, y = phantom_batch()
    assert x.shape == y.shape == (2, 1, 16, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert (y == 5).sum() > 500, "the liver should be the largest organ in the batch"


def test_tiny_logonet_fits_one_batch():
    history = overfit("tiny", steps=75, report_every=25)
    assert history[-1]["liver_dice"] > 0.6, history
    assert history[-1]["loss"] < history[0]["loss"], history
