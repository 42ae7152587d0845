"""nnU-Net's region-based training with LoGoNet, through nnU-Net's commands (slow: ~1 min on 2 cores).

A dataset.json whose labels are regions (lists of label values, overlapping, with
``regions_class_order``), as nnU-Net uses for BraTS: one sigmoid output per region instead of a
softmax over labels. logonet_plan_and_preprocess -> nnUNetv2_train (fold all, one short epoch) ->
nnUNetv2_predict with nnU-Net's default test-time mirroring -> the regions written back as label
values. Accuracy is not the question.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_e2e_nnunet import run, user_environment

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TRAINER = "LoGoNetTrainer_ciMSD"  # 1 epoch x 4 iterations
PLANS = "LoGoNetTinyPlans"
DATASET = "Dataset931_Phantom"


def test_region_based_training_and_prediction(tmp_path):
    env = user_environment(tmp_path / "data")
    run(["logonet_phantom", "-d", "931", "--num-train", "4", "--num-test", "1", "--num-unlabeled", "0",
         "--size", "32", "--seed", "0", "-q"], env)
    raw = Path(env["nnUNet_raw"]) / DATASET
    meta = json.loads((raw / "dataset.json").read_text())
    labels = meta["labels"]
    meta["labels"] = {"background": 0, "organs": [v for k, v in labels.items() if k != "background"],
                      "kidneys": [labels["right_kidney"], labels["left_kidney"]], "liver": labels["liver"]}
    meta["regions_class_order"] = [1, labels["right_kidney"], labels["liver"]]  # value written for each region
    (raw / "dataset.json").write_text(json.dumps(meta, indent=2))

    run(["logonet_plan_and_preprocess", "-d", "931", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres",
         "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_train", "931", "3d_fullres", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
    fold = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_all"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    heads = [w for k, w in weights.items() if "seg_layers" in k and k.endswith("weight")]
    assert heads and all(w.shape[0] == 3 for w in heads), [tuple(w.shape) for w in heads]  # one output per region

    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "931", "-c", "3d_fullres",
         "-f", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    for image_file in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(image_file))
        seg = sitk.ReadImage(str(pred / image_file.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == image.GetSize()
        values = set(np.unique(sitk.GetArrayFromImage(seg)).tolist())
        assert values <= {0, *meta["regions_class_order"]}, values
