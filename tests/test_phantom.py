"""The built-in phantom: realism properties a user trains on, file layout nnU-Net reads, the
``logonet_phantom`` command's bad-input handling, and acceptance by nnU-Net's own commands."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_logonet.phantom import (
    LABELS,
    MAX_SIZE,
    MIN_SIZE,
    case_seed,
    generate_case,
    write_dataset,
)
from nnunet_logonet.phantom import writer as phantom_writer
from nnunet_logonet.phantom.cli import main

FOREGROUND = [name for name in LABELS if name != "background"]
# plausible median HU inside each organ of a contrast-enhanced abdominal CT (after partial volume)
CT_RANGES = {"spleen": (20, 160), "right_kidney": (60, 260), "left_kidney": (60, 260),
             "gallbladder": (-20, 60), "liver": (40, 160), "aorta": (90, 320)}


def _command(name: str) -> str:
    """A console script installed next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nnunet_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(tmp / name)
        (tmp / name).mkdir(parents=True, exist_ok=True)
    # 0 would make nnU-Net's planner call torch.set_num_threads(0) and crash
    env.update(nnUNet_n_proc_DA="1", nnUNet_compile="f", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def cases():
    """Twenty training cases at the default size, generated in memory."""
    return [generate_case(case_seed(0, "train", i), size=64) for i in range(20)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    return write_dataset(root, 900, num_train=6, num_test=2, num_unlabeled=2, seed=0, size=48)


# ---------------------------------------------------------------------------------------------
# dataset layout and dataset.json
# ---------------------------------------------------------------------------------------------


def test_nnunet_layout_and_dataset_json(dataset):
    assert dataset.name == "Dataset900_Phantom"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == LABELS
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz"
    counts = {sub: len(list((dataset / sub).glob("*.nii.gz")))
              for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled")}
    assert counts == {"imagesTr": meta["numTraining"], "labelsTr": meta["numTraining"],
                      "imagesTs": meta["numTest"], "labelsTs": meta["numTest"],
                      "imagesUnlabeled": meta["numUnlabeled"]}
    assert (meta["numTraining"], meta["numTest"], meta["numUnlabeled"]) == (6, 2, 2)
    for label_file in (dataset / "labelsTr").glob("*.nii.gz"):
        assert (dataset / "imagesTr" / label_file.name.replace(".nii.gz", "_0000.nii.gz")).is_file()
        values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))))
        assert set(values.tolist()) <= set(meta["labels"].values())
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")], "temp folder left"


def test_image_and_label_share_geometry_and_types(dataset):
    for split, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for label_file in (dataset / labels).glob("*.nii.gz"):
            image = sitk.ReadImage(str(dataset / split / label_file.name.replace(".nii.gz", "_0000.nii.gz")))
            label = sitk.ReadImage(str(label_file))
            assert image.GetSize() == label.GetSize()
            assert image.GetSpacing() == label.GetSpacing()
            assert image.GetOrigin() == label.GetOrigin()
            assert image.GetDirection() == label.GetDirection()
            assert image.GetPixelID() == sitk.sitkInt16
            assert label.GetPixelID() == sitk.sitkUInt8
            assert image.GetSize()[:2] == (48, 48)


def test_spacing_anisotropic_and_varying(dataset):
    spacings = np.array([sitk.ReadImage(str(p)).GetSpacing()
                         for p in sorted((dataset / "imagesTr").glob("*.nii.gz"))])
    assert np.all(spacings[:, 2] > 1.2 * spacings[:, :2].max(axis=1)), spacings
    assert np.allclose(spacings[:, 0], spacings[:, 1])
    assert len(np.unique(spacings[:, 0])) > 1 and len(np.unique(spacings[:, 2])) > 1, spacings
    shapes = {sitk.ReadImage(str(p)).GetSize()[2] for p in (dataset / "imagesTr").glob("*.nii.gz")}
    assert len(shapes) > 1, "the number of slices should vary with scan length and slice spacing"


# ---------------------------------------------------------------------------------------------
# realism: labels, intensities, variability
# ---------------------------------------------------------------------------------------------


def test_every_label_present_in_most_cases_and_some_organ_missing_sometimes(cases):
    present = {name: sum(bool(np.any(c.label == LABELS[name])) for c in cases) for name in FOREGROUND}
    assert all(count >= 0.8 * len(cases) for count in present.values()), present
    complete = sum(all(np.any(c.label == LABELS[n]) for n in FOREGROUND) for c in cases)
    assert 0.5 * len(cases) <= complete < len(cases), f"{complete} of {len(cases)} cases complete"


def test_median_intensity_per_organ_in_ct_range(cases):
    for name, (low, high) in CT_RANGES.items():
        medians = [float(np.median(c.image[c.label == LABELS[name]])) for c in cases
                   if np.any(c.label == LABELS[name])]
        assert medians and low <= min(medians) and max(medians) <= high, (name, medians)


def test_body_tissues_in_ct_ranges(cases):
    for case in cases:
        image = case.image
        assert np.median(image[:, :2, :]) < -900  # air above the patient
        assert image.max() > 300  # bone (spine, ribs)
        body = image > -500
        fat = (image > -150) & (image < -50)
        assert 0.1 < fat.sum() / body.sum() < 0.7  # subcutaneous + visceral fat
        assert image.dtype == np.int16 and case.label.dtype == np.uint8
    assert any((c.image < -700).sum() > 0.02 * c.image.size for c in cases)  # lung bases / gas


def test_organ_sizes_and_positions_vary(cases):
    volumes = np.array([[np.sum(c.label == LABELS[n]) * np.prod(c.spacing) for n in ("liver", "spleen")]
                        for c in cases])
    assert np.all(volumes.std(axis=0) / volumes.mean(axis=0) > 0.1), volumes
    # liver on the patient's right (low x in LPS), spleen on the left
    for c in cases:
        for name, side in (("liver", -1), ("spleen", 1)):
            x = np.nonzero(c.label == LABELS[name])[2]
            if len(x):
                assert side * (x.mean() - c.label.shape[2] / 2) > 0, name


def test_written_geometry_puts_each_organ_on_its_side_of_the_body(dataset):
    """In the NIfTI files' physical (LPS) space the body's midline is x = 0 and the patient's right is -x:
    liver and right kidney there, spleen and left kidney on +x, under the documented BTCV-style labels."""
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    assert (labels["right_kidney"], labels["left_kidney"]) == (2, 3)
    for label_file in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        label = sitk.ReadImage(str(label_file))
        centre = label.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in label.GetSize()])
        assert abs(centre[0]) < label.GetSpacing()[0], (label_file.name, centre)
        array = sitk.GetArrayFromImage(label)
        for organ, side in (("liver", -1), ("right_kidney", -1), ("spleen", 1), ("left_kidney", 1)):
            z, y, x = np.nonzero(array == labels[organ])
            assert len(x), (label_file.name, organ)
            point = label.TransformContinuousIndexToPhysicalPoint([x.mean(), y.mean(), z.mean()])
            assert side * point[0] > 0, (label_file.name, organ, point)


def test_generate_case_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        generate_case(0, size=MIN_SIZE - 1)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path, dataset):
    kwargs = dict(num_train=2, num_test=1, num_unlabeled=1, size=48)
    first = _hashes(write_dataset(tmp_path / "a", 900, seed=0, **kwargs))
    second = _hashes(write_dataset(tmp_path / "b", 900, seed=0, **kwargs))
    other = _hashes(write_dataset(tmp_path / "c", 900, seed=1, **kwargs))
    assert first == second
    images = [k for k in first if k.endswith(".nii.gz")]
    assert all(first[k] != other[k] for k in images)
    # adding cases never changes existing ones: the module dataset has 6 training cases
    bigger = _hashes(dataset)
    assert all(bigger[k] == first[k] for k in images)


# ---------------------------------------------------------------------------------------------
# command line: bad input, overwrite protection, atomic writes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--num-train", "0"], "--num-train"),
    (["--num-test", "-1"], "--num-test"),
    (["--num-unlabeled", "-3"], "--num-unlabeled"),
    (["--size", "4"], "--size"),
    (["--seed", "-1"], "--seed"),
    (["--name", "My_Data"], "--name"),
    (["--format", "msd", "-d", "120"], "--dataset-id"),
    (["--format", "dicom"], "--format"),
    (["--bogus"], "--bogus"),
])
def test_cli_rejects_bad_values_naming_the_flag(tmp_path, capsys, argv, flag):
    if "-d" not in argv:
        argv = ["-d", "900", *argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error" in error and flag in error, error
    assert not list(tmp_path.iterdir()), "nothing may be written on bad input"


def test_cli_size_error_states_minimum(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["-d", "900", "--size", "4", "-o", str(tmp_path)])
    assert str(MIN_SIZE) in capsys.readouterr().err


def test_cli_rejects_id_used_by_another_dataset(tmp_path, capsys):
    (tmp_path / "Dataset901_Other").mkdir()
    with pytest.raises(SystemExit):
        main(["-d", "901", "-o", str(tmp_path), "-q"])
    error = capsys.readouterr().err
    assert "--dataset-id" in error and "Dataset901_Other" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset901_Other"]


def test_cli_rejects_id_used_in_nnunets_other_folders(tmp_path, monkeypatch, capsys):
    """nnU-Net finds a dataset id in nnUNet_raw, _preprocessed and _results, and stops ('More than one dataset
    name found') where two names share it."""
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    (tmp_path / "results" / "Dataset903_Other").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset903_Phantom").mkdir(parents=True)  # the same name: the phantom's own, fine
    with pytest.raises(SystemExit):
        main(["-d", "903", "-o", str(tmp_path / "raw"), "-q"])
    error = capsys.readouterr().err
    assert "Dataset903_Other" in error and "nnUNet_results" in error and "Choose another id" in error
    assert not (tmp_path / "raw").exists()


def test_overwrite_of_a_planned_dataset_says_to_plan_again_with_clean(tmp_path, monkeypatch, capsys):
    """nnU-Net reuses an existing fingerprint unless --clean: planned as the next command said, the new data
    got the old data's plans."""
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    args = ["-d", "904", "--num-train", "1", "--num-test", "0", "--num-unlabeled", "0", "--size", "32",
            "-o", str(tmp_path / "raw"), "-q"]
    main(args)
    error = capsys.readouterr().err  # the next commands: ours for LoGoNet, nnU-Net's for its baseline
    assert "next: logonet_plan_and_preprocess -d 904 -pl LoGoNetTinyPlanner --verify_dataset_integrity" in error
    assert "nnUNetv2_plan_and_preprocess -d 904 -c 3d_fullres" in error and "--clean" not in error
    (tmp_path / "pre" / "Dataset904_Phantom").mkdir(parents=True)
    main([*args, "--overwrite"])
    error = capsys.readouterr().err
    assert "plan again with --clean" in error and "-pl LoGoNetTinyPlanner --verify_dataset_integrity --clean" in error
    assert error.rstrip().endswith("nnUNetv2_plan_and_preprocess -d 904 -c 3d_fullres --clean")


def test_next_step_of_a_dataset_outside_nnunet_raw_puts_it_where_nnunet_finds_it_when_pasted(tmp_path, monkeypatch,
                                                                                             capsys):
    """nnU-Net finds a dataset ID only under $nnUNet_raw: with -o elsewhere, the plan command the hint gave failed
    ("Could not find a dataset with the ID"). Paths with spaces are quoted, so the hint works pasted."""
    raw = tmp_path / "nnUNet raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    common = ["--num-train", "5", "--num-test", "0", "--num-unlabeled", "0", "--size", "32", "-q"]
    main(["-d", "906", "-o", str(tmp_path / "other place"), *common])
    hint = capsys.readouterr().err.split("next: ", 1)[1]
    move, plan = hint.split(" (nnU-Net finds datasets only under $nnUNet_raw", 1)
    subprocess.run(["bash", "-c", move], env={**os.environ, "nnUNet_raw": str(raw)}, check=True)
    assert (raw / "Dataset906_Phantom" / "dataset.json").is_file() and not list((tmp_path / "other place").iterdir())
    assert "then logonet_plan_and_preprocess -d 906 -pl LoGoNetTinyPlanner" in plan

    monkeypatch.delenv("nnUNet_raw")
    main(["-d", "907", "-o", str(tmp_path / "other place"), *common])
    hint = capsys.readouterr().err.split("next: ", 1)[1]
    assert hint.startswith(f"export nnUNet_raw={shlex.quote(str(tmp_path / 'other place'))} (")
    main(["-d", "8", "--format", "msd", "-o", str(tmp_path / "msd data"), *common])
    task = shlex.quote(str(tmp_path / "msd data" / "Task08_Phantom"))
    assert capsys.readouterr().err.rstrip().endswith(f"next: nnUNetv2_convert_MSD_dataset -i {task}")
    monkeypatch.setenv("nnUNet_raw", str(raw))
    main(["-d", "908", "-o", str(raw), *common])  # in $nnUNet_raw itself: the plan command alone
    assert "next: logonet_plan_and_preprocess -d 908" in capsys.readouterr().err


def test_cli_says_when_there_are_too_few_cases_for_nnunets_five_folds(tmp_path, capsys):
    """With 4 training cases nnUNetv2_train ... 0 stopped in sklearn ("Cannot have number of splits")."""
    common = ["--num-test", "0", "--num-unlabeled", "0", "--size", "32", "-q"]
    main(["-d", "905", "--num-train", "4", "-o", str(tmp_path / "a"), *common])
    assert "note: 4 training case(s): nnU-Net's folds 0-4 need 5 or more" in capsys.readouterr().err
    main(["-d", "905", "--num-train", "5", "-o", str(tmp_path / "b"), *common])
    assert "folds 0-4" not in capsys.readouterr().err


def test_cli_needs_output_folder(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit):
        main(["-d", "900"])
    assert "nnUNet_raw" in capsys.readouterr().err


def test_cli_never_overwrites_without_flag(tmp_path, capsys):
    args = ["-d", "902", "--num-train", "1", "--num-test", "0", "--num-unlabeled", "0",
            "--size", "32", "-o", str(tmp_path), "-q"]
    main(args)
    folder = tmp_path / "Dataset902_Phantom"
    before = _hashes(folder)
    with pytest.raises(SystemExit):
        main([*args, "--seed", "5"])
    assert "--overwrite" in capsys.readouterr().err
    assert _hashes(folder) == before
    main([*args, "--seed", "5", "--overwrite"])
    assert _hashes(folder) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset902_Phantom"]


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return generate_case(*args, **kwargs)

    monkeypatch.setattr(phantom_writer, "generate_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, 903, num_train=4, num_test=0, num_unlabeled=0, size=32)
    assert list(tmp_path.iterdir()) == []


def test_rerun_removes_what_a_killed_run_left_and_nothing_else(tmp_path):
    """SIGKILL (or SIGTERM before the handler) skips the cleanup; the next run of the same target removes
    that target's hidden work folders whose process is gone, and keeps everything else."""
    stale = [".Dataset905_Phantom.abcd_123.partial",  # written before pids were recorded
             ".Dataset905_Phantom.99999999-abcd_123.partial"]  # a pid above Linux's pid_max: gone
    kept = [f".Dataset905_Phantom.{os.getpid()}-abcd_123.partial",  # a live run's
            ".Dataset906_Phantom.abcd_123.partial", ".Dataset905_Phantom.notes"]
    for folder in stale + kept:
        (tmp_path / folder).mkdir()
    write_dataset(tmp_path, 905, num_train=1, num_test=0, num_unlabeled=0, size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["Dataset905_Phantom", *kept])


def test_sigterm_removes_the_partial_folder(tmp_path, monkeypatch, capsys):
    """``timeout`` and ``kill`` send SIGTERM: the console script exits through its cleanup."""
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return generate_case(*args, **kwargs)

    monkeypatch.setattr(phantom_writer, "generate_case", killed)
    monkeypatch.setattr(sys, "argv", ["logonet_phantom", "-d", "907", "--num-train", "3", "--size", "32", "-q",
                                      "-o", str(tmp_path)])
    def unhandled(signum, frame):  # instead of the default action, which would end pytest
        raise AssertionError("logonet_phantom installed no SIGTERM handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", ["/proc/logonet_no_such_folder", "file/sub"])
def test_cli_output_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys, output):
    (tmp_path / "file").write_text("x")
    output = output if output.startswith("/") else str(tmp_path / output)
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", "908", "--num-train", "1", "--size", "32", "-q", "-o", output])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("logonet_phantom: error: argument -o/--output: cannot write into") and output in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_console_script_reports_one_line_error(tmp_path):
    result = subprocess.run([_command("logonet_phantom"), "-d", "900", "--size", "4", "-o", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--size" in errors[0], result.stderr


# ---------------------------------------------------------------------------------------------
# nnU-Net's own commands
# ---------------------------------------------------------------------------------------------


def test_msd_task_accepted_by_nnunet_converter(tmp_path):
    task = write_dataset(tmp_path / "tasks", 9, fmt="msd", num_train=3, num_test=2,
                         num_unlabeled=1, size=32)
    assert task.name == "Task09_Phantom"
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {str(v): k for k, v in LABELS.items()}
    assert [t["image"] for t in meta["training"]] == [f"./imagesTr/Phantom_00{i}.nii.gz" for i in range(3)]
    assert all((task / entry).is_file() for entry in meta["test"])
    assert len(list((task / "labelsTs").glob("*.nii.gz"))) == 2

    env = _nnunet_env(tmp_path)
    result = subprocess.run([_command("nnUNetv2_convert_MSD_dataset"), "-i", str(task), "-np", "1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    converted = tmp_path / "nnUNet_raw" / "Dataset009_Phantom"
    assert sorted(p.name for p in (converted / "imagesTr").iterdir()) == \
        [f"Phantom_00{i}_0000.nii.gz" for i in range(3)]
    assert len(list((converted / "labelsTr").iterdir())) == 3
    assert len(list((converted / "imagesTs").iterdir())) == 2
    converted_meta = json.loads((converted / "dataset.json").read_text())
    assert converted_meta["labels"] == LABELS
    assert converted_meta["channel_names"] == {"0": "CT"}
    assert converted_meta["numTraining"] == 3


@pytest.mark.slow  # CI plans the phantom with nnU-Net's machinery in test_e2e_nnunet.py
@pytest.mark.e2e
def test_nnunet_plans_and_preprocesses_the_phantom(tmp_path):
    env = _nnunet_env(tmp_path)
    write_dataset(Path(env["nnUNet_raw"]), 900, num_train=4, num_test=0, num_unlabeled=0)
    result = subprocess.run(
        [_command("nnUNetv2_plan_and_preprocess"), "-d", "900", "-c", "3d_fullres",
         "--verify_dataset_integrity", "-np", "1"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    preprocessed = Path(env["nnUNet_preprocessed"]) / "Dataset900_Phantom"
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]
    patch, median = np.array(fullres["patch_size"]), np.array(fullres["median_image_size_in_voxels"])
    assert np.all(patch >= 16) and np.all(patch <= 64), patch
    assert np.all(patch <= np.ceil(median / 16) * 16), (patch, median)
    assert fullres["spacing"][0] > fullres["spacing"][1], fullres["spacing"]  # z thicker
    assert len(list((preprocessed / "nnUNetPlans_3d_fullres").glob("*"))) >= 4


# ---------------------------------------------------------------------------------------------
# names, bounds and metadata
# ---------------------------------------------------------------------------------------------


def test_split_names_and_images_never_repeat_across_splits(dataset):
    """Test and unlabeled cases have their own names and seeds: a test image in the training or pretraining
    data would leak the held-out set."""
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == \
        ["Phantom_ts000_0000.nii.gz", "Phantom_ts001_0000.nii.gz"]
    assert sorted(p.name for p in (dataset / "imagesUnlabeled").iterdir()) == \
        ["Phantom_un000_0000.nii.gz", "Phantom_un001_0000.nii.gz"]
    hashes = [h for sub in ("imagesTr", "imagesTs", "imagesUnlabeled")
              for name, h in _hashes(dataset).items() if name.startswith(sub + "/")]
    assert len(hashes) == 10 and len(set(hashes)) == 10


def test_argument_bounds_are_inclusive_and_name_the_parameter():
    ok = dict(dataset_id=999, name="Phantom", num_train=1, num_test=0, num_unlabeled=0, seed=0, size=MIN_SIZE,
              fmt="nnunet")
    phantom_writer.check_arguments(**ok)
    phantom_writer.check_arguments(**{**ok, "dataset_id": 99, "fmt": "msd", "size": MAX_SIZE})
    for param, value in (("dataset_id", 0), ("num_train", True), ("size", MAX_SIZE + 1)):
        with pytest.raises(phantom_writer.PhantomArgumentError) as error:
            phantom_writer.check_arguments(**{**ok, param: value})
        assert error.value.param == param and repr(value) in str(error.value)


def test_dataset_folder_gets_the_usual_permissions_gzip_files_and_its_seed(tmp_path):
    umask = os.umask(0o022)
    try:
        folder = write_dataset(tmp_path, 910, num_train=1, num_test=1, num_unlabeled=0, seed=5, size=32)
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o755  # a temporary folder is the owner's only
    files = sorted(folder.rglob("*.nii.gz"))
    assert len(files) == 4 and all(p.read_bytes()[:2] == b"\x1f\x8b" for p in files)
    assert json.loads((folder / "dataset.json").read_text())["phantom"] == \
        {"seed": 5, "size": 32, "generator_version": phantom_writer.GENERATOR_VERSION}


def test_root_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = write_dataset("~/raw", 911, num_train=1, num_test=0, num_unlabeled=0, size=32)
    assert folder == tmp_path / "raw" / "Dataset911_Phantom" and folder.is_dir()


def test_msd_dataset_json_lists_test_cases_and_counts(tmp_path):
    task = write_dataset(tmp_path, 9, fmt="msd", num_train=2, num_test=1, num_unlabeled=1, seed=3, size=32)
    meta = json.loads((task / "dataset.json").read_text())
    assert (meta["numTraining"], meta["numTest"]) == (2, 1)
    assert meta["test"] == ["./imagesTs/Phantom_ts000.nii.gz"]
    assert (meta["phantom"]["seed"], meta["phantom"]["numUnlabeled"]) == (3, 1)
    assert [p.name for p in (task / "imagesUnlabeled").iterdir()] == ["Phantom_un000.nii.gz"]


def test_msd_id_used_by_another_task_is_refused(tmp_path):
    (tmp_path / "Task09_Other").mkdir()
    with pytest.raises(phantom_writer.PhantomArgumentError, match="Task09_Other") as error:
        write_dataset(tmp_path, 9, fmt="msd", num_train=1, num_test=0, num_unlabeled=0, size=32)
    assert error.value.param == "dataset_id"
    assert [p.name for p in tmp_path.iterdir()] == ["Task09_Other"]
