"""The network can learn: LoGoNet-tiny fits one phantom batch with nnU-Net's loss and optimizer.

Guards against the failure docs/training_recipe.md describes (a full-resolution path too narrow
to leave the all-background solution), which no shape or parameter test can see.
"""

import pytest
import torch

from nnunet_logonet.benchmark.overfit import build, class_dice, fit_batch, overfit, phantom_batch


def test_phantom_batch_is_normalised_and_labelled():
    x, y = phantom_batch()
    assert x.shape == y.shape == (2, 1, 16, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert (y == 5).sum() > 500, "the liver should be the largest organ in the batch"


def test_class_dice_per_foreground_class_with_absent_classes_at_zero():
    reference = torch.tensor([[0, 1, 1, 2, 2, 2, 0, 0]])
    prediction = torch.tensor([[0, 1, 0, 2, 2, 0, 2, 3]])
    # class 1: tp 1, fn 1 -> 2/3; class 2: tp 2, fp 1, fn 1 -> 4/6; class 3: fp only -> 0; class 4: nowhere -> 0
    assert class_dice(prediction, reference, 5) == pytest.approx([2 / 3, 2 / 3, 0.0, 0.0])
    assert class_dice(reference, reference, 3) == [1.0, 1.0]


def test_tiny_logonet_fits_one_batch():
    history = overfit("tiny", steps=50, report_every=25)  # liver Dice 0.65-0.91 at steps 10-75 (12-07)
    assert history[-1]["liver_dice"] > 0.6, history
    assert history[-1]["loss"] < history[0]["loss"], history


def test_fit_batch_reports_every_class_and_takes_its_learning_rate():
    x, y = phantom_batch()
    runs = {}
    for lr in (1e-2, 1e-7):
        torch.manual_seed(0)
        runs[lr] = fit_batch(build("tiny"), x, y, steps=3, report_every=1, lr=lr)
    for history in runs.values():
        assert [h["step"] for h in history] == [1, 2, 3]
        assert all(len(h["dice"]) == 6 and h["grad_norm"] > 0 for h in history)
    assert runs[1e-2][0]["loss"] == pytest.approx(runs[1e-7][0]["loss"], rel=1e-5)  # same start
    assert runs[1e-2][2]["loss"] < runs[1e-2][0]["loss"] - 0.05, runs[1e-2]
    assert abs(runs[1e-7][2]["loss"] - runs[1e-7][0]["loss"]) < 1e-3, runs[1e-7]
    with pytest.raises(ValueError, match="lr must be > 0"):
        fit_batch(build("tiny"), x, y, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="recipe must be one of"):
        fit_batch(build("tiny"), x, y, steps=1, recipe="adam")


def test_fit_batch_takes_the_paper_recipes_optimizer():
    """'paper': AdamW at 1e-4 (training.recipes): its first step moves every trained weight by about
    the learning rate, whatever the gradient's scale (SGD's step would scale with the gradient)."""
    x, y = phantom_batch()
    torch.manual_seed(0)
    network = build("tiny")
    before = {k: v.detach().clone() for k, v in network.named_parameters()}
    fit_batch(network, x, y, steps=1, report_every=1, recipe="paper")
    moved = torch.cat([(p.detach() - before[k]).abs().flatten() for k, p in network.named_parameters()
                       if p.grad is not None and p.grad.abs().max() > 0])
    assert moved.max() <= 1.01e-4 and moved.median() > 0.9e-4, (moved.max(), moved.median())
