"""The MSD workflow end to end, as docs/msd.md tells a user to run it.

logonet_phantom --format msd -> nnUNetv2_convert_MSD_dataset -> logonet_plan_and_preprocess ->
nnUNetv2_train (fold all, one short epoch) -> nnUNetv2_predict on the converted imagesTs ->
logonet_msd_submission -> reopen the archive: MSD names, the test images' geometry, valid labels.
The training is too short to segment anything; this test is about the last mile, not accuracy.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from test_e2e_nnunet import BIN, run, user_environment

pytestmark = pytest.mark.e2e

TRAINER = "LoGoNetTrainer_ciMSD"
PLANS = "LoGoNetTinyPlans"


def test_msd_task_to_validated_submission_archive(tmp_path):
    env = user_environment(tmp_path / "data")
    msd = tmp_path / "msd"
    run(["logonet_phantom", "--format", "msd", "-d", "77", "--name", "Abdomen", "--num-train", "2",
         "--num-test", "2", "--num-unlabeled", "0", "--size", "32", "--seed", "3", "-o", str(msd), "-q"], env)
    task = msd / "Task77_Abdomen"
    meta = json.loads((task / "dataset.json").read_text())
    test_images = sorted((task / "imagesTs").glob("*.nii.gz"))
    assert len(test_images) == 2

    run([str(BIN / "nnUNetv2_convert_MSD_dataset"), "-i", str(task), "-np", "1"], env)
    dataset = "Dataset077_Abdomen"
    raw = Path(env["nnUNet_raw"]) / dataset
    assert (raw / "dataset.json").is_file()
    run(["logonet_plan_and_preprocess", "-d", "77", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres",
         "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_train", "77", "3d_fullres", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)

    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "77", "-c", "3d_fullres",
         "-f", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
        env)

    archive = tmp_path / "submission.zip"
    report = run(["logonet_msd_submission", "--task", str(task), str(pred), "-o", str(archive)], env)
    assert archive.is_file(), report.stdout

    labels = {int(k) for k in meta["labels"]}
    with zipfile.ZipFile(archive) as zipped:
        names = sorted(n for n in zipped.namelist() if not n.endswith("/"))
        assert names == [f"Task77_Abdomen/{p.name}" for p in test_images]
        zipped.extractall(tmp_path / "unpacked")
    for image_path in test_images:
        image = sitk.ReadImage(str(image_path))
        seg = sitk.ReadImage(str(tmp_path / "unpacked" / "Task77_Abdomen" / image_path.name))
        assert seg.GetSize() == image.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
        values = set(np.unique(sitk.GetArrayFromImage(seg)).tolist())
        assert values <= labels, (image_path.name, values)
        assert sitk.GetArrayFromImage(seg).dtype.itemsize <= 2
