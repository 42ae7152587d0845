"""Does a short LoGoNet training through nnU-Net's commands segment anything? (slow: ~7 min on 2 cores)

logonet_phantom -> logonet_plan_and_preprocess -> nnUNetv2_train (30 epochs x 25 iterations) ->
nnUNetv2_predict -> nnUNetv2_evaluate_folder on held-out cases. CI's own pass
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

from test_e2e_nnunet import run, user_environment

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DATASET = "Dataset900_Phantom"
TRAINER = "LoGoNetTrainer_ciLearning"  # 30 epochs x 25 iterations
PLANS = "LoGoNetTinyPlans"
#: Dice of the liver (largest organ) that an untrained network does not reach: a random
#: initialisation predicts ~0.0-0.1 on it, and every network, nnU-Net's included, sits at the
#: all-background solution (Dice 0) for its first ~100-250 iterations on this phantom. Measured
#: on this data (docs/training_recipe.md): take-off after 10 and 16 epochs of 25 iterations in two
#: runs, fold-0 validation liver Dice 0.57 and 0.31 after 20 epochs; the test trains 30.
LIVER_DICE_FLOOR = 0.25


def test_short_training_segments_the_liver(tmp_path):
    env = user_environment(tmp_path)
    raw = Path(env["nnUNet_raw"]) / DATASET
    run(["logonet_phantom", "-d", "900", "--num-train", "10", "--num-test", "2", "--num-unlabeled", "0",
         "--size", "32", "--seed", "0", "-q"], env)
    run(["logonet_plan_and_preprocess", "-d", "900", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres",
         "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_train", "900", "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "900", "-c", "3d_fullres",
         "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    preprocessed = Path(env["nnUNet_preprocessed"]) / DATASET
    run(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile", str(preprocessed / "dataset.json"),
         "-pfile", str(preprocessed / f"{PLANS}.json"), "-np", "1"], env)

    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    liver = json.loads((pred / "summary.json").read_text())["mean"][str(labels["liver"])]["Dice"]
    assert liver > LIVER_DICE_FLOOR, f"liver Dice {liver:.3f} after {TRAINER}"
