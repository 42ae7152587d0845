"""nnU-Net's cascade with LoGoNet, through nnU-Net's commands (slow: ~3 min on 2 cores).

Where nnU-Net would plan a low-resolution stage (images much larger than the patch: the phantom at
160 voxels, 4 cases: median 58 x 160 x 160, 7.5 patches of LoGoNet-tiny; with 2 cases no low-resolution
stage), LoGoNet's planners write
3d_lowres and 3d_cascade_fullres too. This checks the whole cascade as nnU-Net runs it:
logonet_plan_and_preprocess (both stages) -> nnUNetv2_train 3d_lowres (its validation writes the
segmentations the next stage reads) -> nnUNetv2_train 3d_cascade_fullres (LoGoNet takes the image plus
one channel per foreground label) -> nnUNetv2_predict 3d_lowres, then 3d_cascade_fullres with
-prev_stage_predictions. Accuracy is not the question (one short epoch per stage).
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

TRAINER = "LoGoNetTrainer_ciCascade"  # 1 epoch x 4 iterations, validation without mirroring
PLANS = "LoGoNetTinyPlans"
DATASET = "Dataset921_Phantom"


def test_lowres_then_cascade_train_and_predict(tmp_path):
    env = user_environment(tmp_path / "data")
    run(["logonet_phantom", "-d", "921", "--num-train", "4", "--num-test", "1", "--num-unlabeled", "0",
         "--size", "160", "--seed", "0", "-q"], env)
    run(["logonet_plan_and_preprocess", "-d", "921", "-pl", "LoGoNetTinyPlanner", "-np", "1", "1", "-npfp", "1"], env)
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / f"{PLANS}.json").read_text())
    configs = plans["configurations"]
    assert configs["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert configs["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert configs["3d_lowres"]["architecture"]["network_class_name"] == "nnunet_logonet.network.logonet.LoGoNet"

    results = Path(env["nnUNet_results"]) / DATASET
    for config in ("3d_lowres", "3d_cascade_fullres"):
        run(["nnUNetv2_train", "921", config, "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
        assert (results / f"{TRAINER}__{PLANS}__{config}" / "fold_all" / "checkpoint_final.pth").is_file()
    next_stage = results / f"{TRAINER}__{PLANS}__3d_lowres" / "predicted_next_stage" / "3d_cascade_fullres"
    assert len(list(next_stage.iterdir())) == 4, "the low-resolution validation wrote no segmentation per case"

    labels = json.loads((Path(env["nnUNet_raw"]) / DATASET / "dataset.json").read_text())["labels"]
    checkpoint = torch.load(results / f"{TRAINER}__{PLANS}__3d_cascade_fullres" / "fold_all" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    first_conv = next(w for w in checkpoint["network_weights"].values() if w.ndim == 5)
    assert first_conv.shape[1] == 1 + (len(labels) - 1), first_conv.shape  # image + one-hot foreground labels

    images = Path(env["nnUNet_raw"]) / DATASET / "imagesTs"
    low, cascade = tmp_path / "pred_lowres", tmp_path / "pred_cascade"
    predict = ["nnUNetv2_predict", "-i", str(images), "-d", "921", "-f", "all", "-tr", TRAINER, "-p", PLANS,
               "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    run(predict + ["-o", str(low), "-c", "3d_lowres"], env)
    run(predict + ["-o", str(cascade), "-c", "3d_cascade_fullres", "-prev_stage_predictions", str(low)], env)
    for image_file in sorted(images.glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(image_file))
        seg = sitk.ReadImage(str(cascade / image_file.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == image.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= set(labels.values())
