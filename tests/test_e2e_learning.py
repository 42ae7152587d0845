"""Does a short LoGoNet training through nnU-Net's commands segment anything? (slow: ~5 min on 2 cores)

logonet_phantom -> logonet_plan_and_preprocess -> nnUNetv2_train (30 epochs x 25 iterations), then
again with --val --npz -> nnUNetv2_predict -> nnUNetv2_evaluate_folder on held-out cases. CI's own pass
(tests/test_e2e_nnunet.py) trains 40 iterations and checks the workflow; this one checks that the
whole pipeline (nnU-Net's sampling and augmentation, LoGoNet, its fast inference paths) learns.
Run it with ``bash scripts/test.sh -m slow``. It caught the too-narrow first `tiny` decoder, which
stayed at the all-background solution (docs/training_recipe.md); tests/test_learning.py guards that
one in every CI run, on one batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_e2e_nnunet import DATASET, PLANS, predict_and_evaluate, run, user_environment, write_and_plan_phantom

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TRAINER = "LoGoNetTrainer_ciLearning"  # 30 epochs x 25 iterations
#: Dice of the liver (largest organ) that an untrained network does not reach: a random
#: initialisation predicts ~0.0-0.1 on it, and every network, nnU-Net's included, sits at the
#: all-background solution (Dice 0) for its first ~100-250 iterations on this phantom. Measured
#: on this data (docs/training_recipe.md): take-off after 10 and 16 epochs of 25 iterations in two
#: runs, fold-0 validation liver Dice 0.57 and 0.31 after 20 epochs; the test trains 30.
LIVER_DICE_FLOOR = 0.25


def test_short_training_segments_the_liver(tmp_path):
    env = user_environment(tmp_path)
    write_and_plan_phantom(env)
    train = ["nnUNetv2_train", "900", "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"]
    run(train, env)
    # validation only (README: --val) from checkpoint_final: the training's own validation again, and
    # the softmax probabilities find_best_configuration's ensembling reads
    validation = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0" / "validation"
    validated = json.loads((validation / "summary.json").read_text())["foreground_mean"]["Dice"]
    run(train + ["--val", "--npz"], env)
    again = json.loads((validation / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert again == pytest.approx(validated, abs=1e-4), (validated, again)
    assert list(validation.glob("*.npz")), "--val --npz exported no probabilities"
    summary = predict_and_evaluate(env, TRAINER, tmp_path / "pred")

    labels = json.loads((Path(env["nnUNet_raw"]) / DATASET / "dataset.json").read_text())["labels"]
    liver = summary["mean"][str(labels["liver"])]["Dice"]
    assert liver > LIVER_DICE_FLOOR, f"liver Dice {liver:.3f} after {TRAINER}"
