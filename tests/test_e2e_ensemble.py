"""LoGoNet against nnU-Net's baseline on the same folds, ranked and ensembled by nnU-Net (slow: ~3 min on 2 cores).

The workflow README and docs/msd.md give a user who benchmarks LoGoNet against nnU-Net: both trained on
the same folds (0 and 1 here, of nnU-Net's five) with ``--npz`` -> ``python -m nnunet_logonet.demo.rank ... --ensembling`` (nnU-Net's
``find_best_configuration``: each model, their ensemble, postprocessing) -> the commands nnU-Net writes
to ``inference_instructions.txt``, run as written (with the CPU flags) -> and, whichever won,
``nnUNetv2_ensemble`` of the two models' test-set probabilities, each predicted by both folds. Accuracy is not the question: one short
epoch each.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from test_e2e_nnunet import run, user_environment

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DATASET_ID = "932"
DATASET = "Dataset932_Phantom"
BASELINE = ("nnUNetTrainer_ciEnsemble", "nnUNetPlans")  # tests/ext_trainers: 1 epoch x 4 iterations
LOGONET = ("LoGoNetTrainer_ciMSD", "LoGoNetTinyPlans")
#: what a CPU user adds to the instructions' nnUNetv2_predict lines (they are written for a GPU)
CPU_PREDICT_FLAGS = ["-device", "cpu", "-npp", "1", "-nps", "1"]
FOLDS = ["0", "1"]


def predict(env: dict, model: tuple[str, str], images: Path, out: Path, *extra: str) -> None:
    trainer, plans = model
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres", "-f", *FOLDS,
         "-tr", trainer, "-p", plans, *CPU_PREDICT_FLAGS, *extra], env)


def instruction_commands(text: str, folders: dict[str, Path]) -> list[list[str]]:
    """The command lines of nnU-Net's inference_instructions.txt with its placeholder folders filled in."""
    commands = []
    for line in text.splitlines():
        if not line.startswith("nnUNetv2_"):
            continue
        words = [str(folders.get(word, word)) for word in shlex.split(line)]
        assert not [w for w in words if w.isupper() and "FOLDER" in w], f"placeholder left in {line!r}"
        if words[0] == "nnUNetv2_predict":
            words += CPU_PREDICT_FLAGS
        commands.append(words)
    return commands


def assert_segmentations_of(images: Path, folder: Path, labels: set[int]) -> None:
    image_files = sorted(images.glob("*_0000.nii.gz"))
    assert image_files
    for image_file in image_files:
        image = sitk.ReadImage(str(image_file))
        seg = sitk.ReadImage(str(folder / image_file.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == image.GetSize() and np.allclose(seg.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= labels


def test_logonet_and_nnunet_ranked_and_ensembled_by_nnunet(tmp_path):
    env = user_environment(tmp_path / "data")
    run(["logonet_phantom", "-d", DATASET_ID, "--num-train", "6", "--num-test", "2", "--num-unlabeled", "0",
         "--size", "32", "--seed", "0", "-q"], env)
    # nnU-Net's plans first; LoGoNet's planner then reuses their 3d_fullres data (README)
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    planned = run(["logonet_plan_and_preprocess", "-d", DATASET_ID, "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres",
                   "-np", "1", "-npfp", "1"], env)
    assert "reusing the data already preprocessed in" in planned.stdout and "shared with nnUNetPlans" in planned.stdout
    forced = run(["logonet_plan_and_preprocess", "-d", DATASET_ID, "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres",
                  "-np", "1", "-npfp", "1", "--force_pp"], env)  # docs/planning.md: --force_pp redoes it in any case
    assert "reusing" not in forced.stdout and "Preprocessing" in forced.stdout
    assert "is nnUNetPlans' data folder too (same preprocessing) and is made again in place" in forced.stdout
    for trainer, plans in (BASELINE, LOGONET):
        for fold in FOLDS:
            run(["nnUNetv2_train", DATASET_ID, "3d_fullres", fold, "-tr", trainer, "-p", plans, "-device", "cpu",
                 "--npz"], env)

    results = Path(env["nnUNet_results"]) / DATASET
    run(["python", "-m", "nnunet_logonet.demo.rank", DATASET_ID, ":".join(BASELINE), ":".join(LOGONET),
         "-f", *FOLDS, "--ensembling"], env)
    info = json.loads((results / "inference_information.json").read_text())
    identifiers = [f"{trainer}__{plans}__3d_fullres" for trainer, plans in (BASELINE, LOGONET)]
    ensemble = f"ensemble___{identifiers[0]}___{identifiers[1]}___{'_'.join(FOLDS)}"
    assert set(info["all_results"]) == {*identifiers, ensemble}
    assert all(0.0 <= dice <= 1.0 for dice in info["all_results"].values()), info["all_results"]
    assert (results / "ensembles" / ensemble / "summary.json").is_file()
    won = info["best_model_or_ensemble"]["selected_model_or_models"]
    assert len(won) in (1, 2) and {m["trainer"] for m in won} <= {BASELINE[0], LOGONET[0]}
    assert info["folds"] == [int(f) for f in FOLDS]

    raw = Path(env["nnUNet_raw"]) / DATASET
    images = raw / "imagesTs"
    labels = set(json.loads((raw / "dataset.json").read_text())["labels"].values())
    # nnU-Net's instructions, as written, whichever model or ensemble won
    folders = {"INPUT_FOLDER": images, "OUTPUT_FOLDER": tmp_path / "best", "OUTPUT_FOLDER_PP": tmp_path / "best_pp",
               "OUTPUT_FOLDER_MODEL_1": tmp_path / "member_1", "OUTPUT_FOLDER_MODEL_2": tmp_path / "member_2"}
    commands = instruction_commands((results / "inference_instructions.txt").read_text(), folders)
    assert [c[0] for c in commands] == ["nnUNetv2_predict"] * len(won) + ["nnUNetv2_ensemble"] * (len(won) == 2) + [
        "nnUNetv2_apply_postprocessing"]
    for command in commands:
        run(command, env)
    assert_segmentations_of(images, tmp_path / "best_pp", labels)

    # the ensemble of LoGoNet and nnU-Net on the test images: the argmax of their mean probabilities
    members = [tmp_path / "logonet", tmp_path / "nnunet"]
    predict(env, LOGONET, images, members[0], "--save_probabilities")
    predict(env, BASELINE, images, members[1], "--save_probabilities")
    run(["nnUNetv2_ensemble", "-i", *map(str, members), "-o", str(tmp_path / "ensemble"), "-np", "1"], env)
    assert_segmentations_of(images, tmp_path / "ensemble", labels)
    npzs = sorted(members[0].glob("*.npz"))
    assert len(npzs) == len(list(images.glob("*_0000.nii.gz")))
    for npz in npzs:
        probabilities = [np.load(folder / npz.name)["probabilities"] for folder in members]
        assert probabilities[0].shape == probabilities[1].shape and probabilities[0].shape[0] == len(labels)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ensemble" / f"{npz.stem}.nii.gz")))
        expected = np.argmax(np.mean(probabilities, axis=0), axis=0)
        assert np.mean(seg == expected) > 0.999  # float32 ties of the two-model mean may break either way

    # a model validated without --npz cannot be ensembled: the ranking says how to mend it
    for npz in (results / f"{BASELINE[0]}__{BASELINE[1]}__3d_fullres" / "fold_1" / "validation").glob("*.npz"):
        npz.unlink()
    refused = run(["python", "-m", "nnunet_logonet.demo.rank", DATASET_ID, ":".join(BASELINE), ":".join(LOGONET),
                   "-f", *FOLDS, "--ensembling"], env, check=False)
    assert refused.returncode == 1 and "--val --npz" in refused.stderr and BASELINE[0] in refused.stderr
