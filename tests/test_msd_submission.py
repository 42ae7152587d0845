"""logonet_msd_submission: validation failures, archive layout and naming, on a tiny fake MSD task.

The tasks are written here with SimpleITK (a few voxels per axis), predictions are random valid
label maps on the test image's grid, then broken one way per test.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_logonet.msd import IncompleteSubmissionError, validate_task, write_submission
from nnunet_logonet.msd.submission import main
from nnunet_logonet.msd.task import read_geometry
from nnunet_logonet.msd.validation import check_prediction

SPLEEN_LABELS = {"0": "background", "1": "spleen"}
HEART_LABELS = {"0": "background", "1": "left atrium"}


def _image(array: np.ndarray, spacing, origin, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def make_msd_task(root: Path, name: str, prefix: str, labels: dict, n_test: int = 3,
                  seed: int = 0, channels: int = 1, list_test: bool = True) -> Path:
    """An MSD task folder: each test image with its own size, spacing, origin and direction."""
    rng = np.random.default_rng(seed)
    task = root / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    train_image = _image(rng.normal(size=(5, 8, 8)).astype(np.float32), (1.0, 1.0, 2.0), (0, 0, 0))
    sitk.WriteImage(train_image, str(task / "imagesTr" / f"{prefix}_2.nii.gz"))
    sitk.WriteImage(_image(np.zeros((5, 8, 8), np.uint8), (1.0, 1.0, 2.0), (0, 0, 0)),
                    str(task / "labelsTr" / f"{prefix}_2.nii.gz"))
    test = []
    for i in range(n_test):
        shape = (4 + i, 7 + i, 6)  # z, y, x
        spacing = (0.7 + 0.1 * i, 0.8, 2.5 + i)
        origin = (-10.5 * i, 3.25, 100.0 + i)
        direction = (1, 0, 0, 0, -1, 0, 0, 0, 1) if i % 2 else (1, 0, 0, 0, 1, 0, 0, 0, 1)
        array = rng.normal(size=shape).astype(np.float32)
        if channels == 1:
            image = _image(array, spacing, origin, direction)
        else:  # 4D multi-modal test image, as in Task01_BrainTumour / Task05_Prostate
            image = sitk.JoinSeries([_image(array, spacing, origin, direction)] * channels)
            image.SetDirection((*direction[0:3], 0, *direction[3:6], 0, *direction[6:9], 0,
                                0, 0, 0, 1))
        file_name = f"{prefix}_{2 * i + 1}.nii.gz"
        sitk.WriteImage(image, str(task / "imagesTs" / file_name))
        test.append(f"./imagesTs/{file_name}")
    meta = {"name": name.split("_")[1], "tensorImageSize": "3D" if channels == 1 else "4D",
            "modality": {"0": "CT"}, "labels": labels, "numTraining": 1, "numTest": n_test,
            "training": [{"image": f"./imagesTr/{prefix}_2.nii.gz",
                          "label": f"./labelsTr/{prefix}_2.nii.gz"}],
            "test": test if list_test else []}
    (task / "dataset.json").write_text(json.dumps(meta, indent=2))
    return task


def test_cases(task: Path) -> list[Path]:
    return sorted((task / "imagesTs").glob("*.nii.gz"))


test_cases.__test__ = False  # a helper, not a test


def predict_like(test_image: Path, target: Path, labels=(0, 1), seed: int = 0,
                 dtype=np.uint8) -> np.ndarray:
    """A random valid label map on the test image's grid (what a correct model writes)."""
    geometry = read_geometry(test_image)
    array = np.random.default_rng(seed).choice(np.asarray(labels), size=geometry.size[::-1])
    array = array.astype(dtype)
    sitk.WriteImage(_image(array, geometry.spacing, geometry.origin, geometry.direction),
                    str(target))
    return array


def predict_all(task: Path, folder: Path, rename=lambda name: name) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    return {image.name: predict_like(image, folder / rename(image.name), seed=i)
            for i, image in enumerate(test_cases(task))}


@pytest.fixture
def spleen(tmp_path):
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS)
    predictions = predict_all(task, tmp_path / "pred")
    out = tmp_path / "out"
    out.mkdir()
    return task, tmp_path / "pred", predictions, out


def read_zip_member(archive: zipfile.ZipFile, name: str, scratch: Path) -> sitk.Image:
    target = scratch / name.replace("/", "__")
    target.write_bytes(archive.read(name))
    return sitk.ReadImage(str(target))


def assert_nothing_written(out: Path) -> None:
    assert list(out.iterdir()) == [], "a refused submission must leave no file, not even a temp"


def test_happy_path_archive_has_msd_names_geometry_and_labels(spleen, tmp_path, capsys):
    task, pred, predictions, out = spleen
    archive_path = out / "submission.zip"
    assert main(["--task", str(task), str(pred), "-o", str(archive_path)]) == 0
    assert "3 valid, 0 invalid, 0 missing" in capsys.readouterr().out
    with zipfile.ZipFile(archive_path) as archive:
        files = sorted(n for n in archive.namelist() if not n.endswith("/"))
        assert files == sorted(f"Task09_Spleen/{name}" for name in predictions)
        for name, expected in predictions.items():
            image = read_zip_member(archive, f"Task09_Spleen/{name}", tmp_path)
            reference = read_geometry(task / "imagesTs" / name)
            assert image.GetSize() == reference.size
            np.testing.assert_allclose(image.GetSpacing(), reference.spacing, rtol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), reference.origin, atol=1e-5)
            np.testing.assert_allclose(image.GetDirection(), reference.direction, atol=1e-6)
            assert image.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
            # uint8 .nii.gz, as nnUNetv2_predict writes it, goes in untouched (stored: gzip is not zipped again)
            assert archive.read(f"Task09_Spleen/{name}") == (pred / name).read_bytes()
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    assert [p.name for p in out.iterdir()] == ["submission.zip"]


def test_failure_while_writing_leaves_no_partial_archive(spleen):
    task, pred, _, out = spleen
    report = validate_task(task, pred, progress=False)
    (pred / "spleen_5.nii.gz").unlink()  # vanishes between validation and packing
    with pytest.raises(ValueError, match="spleen_5.nii.gz.*nothing written"):
        write_submission([report], out / "s.zip", progress=False)
    assert_nothing_written(out)


def test_missing_case_is_named_and_nothing_written(spleen, capsys):
    task, pred, predictions, out = spleen
    (pred / "spleen_3.nii.gz").unlink()
    report = validate_task(task, pred, progress=False)
    assert report.missing == ["spleen_3.nii.gz"] and not report.complete
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.zip")]) == 1
    assert "MISSING spleen_3.nii.gz" in capsys.readouterr().out
    assert_nothing_written(out)
    with pytest.raises(IncompleteSubmissionError):
        write_submission([(task, pred)], out / "s.zip", progress=False)
    assert_nothing_written(out)


def test_a_folder_named_like_a_case_is_named_as_a_folder_not_missing(spleen, capsys):
    """A prediction unzipped into a folder of the file's name: the file is not missing, it is in the wrong place."""
    task, pred, _, out = spleen
    (pred / "spleen_3.nii.gz").unlink()
    (pred / "spleen_3.nii.gz").mkdir()
    report = validate_task(task, pred, progress=False)
    assert report.missing == [] and [r.case for r in report.invalid] == ["spleen_3.nii.gz"]
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.zip")]) == 1
    printed = capsys.readouterr().out
    folder = pred.resolve() / "spleen_3.nii.gz"
    assert f"INVALID spleen_3.nii.gz: {folder} is a folder, not a prediction file" in printed
    assert_nothing_written(out)


def _wrong_spacing(image_path: Path, pred_path: Path) -> None:
    g = read_geometry(image_path)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))
    spacing = (g.spacing[0], g.spacing[1], g.spacing[2] * 1.5)
    sitk.WriteImage(_image(array, spacing, g.origin, g.direction), str(pred_path))


def _unknown_label(image_path: Path, pred_path: Path) -> None:
    predict_like(image_path, pred_path, labels=(0, 1, 2))


def _four_d(image_path: Path, pred_path: Path) -> None:
    g = read_geometry(image_path)
    volume = _image(np.zeros(g.size[::-1], np.uint8), g.spacing, g.origin, g.direction)
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(pred_path))


def _trailing_singleton(image_path: Path, pred_path: Path) -> None:
    """A 4D file with a last axis of size 1: ITK reads it as 3D, nibabel (and the evaluation) as 4D."""
    g = read_geometry(image_path)
    volume = _image(np.zeros(g.size[::-1], np.uint8), g.spacing, g.origin, g.direction)
    sitk.WriteImage(sitk.JoinSeries([volume]), str(pred_path))


def _image_intensities(image_path: Path, pred_path: Path) -> None:
    """The test image itself (as int16 CT) instead of its prediction."""
    g = read_geometry(image_path)
    array = np.random.default_rng(0).integers(-1000, 1000, size=g.size[::-1]).astype(np.int16)
    sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))


def _float_nan(image_path: Path, pred_path: Path) -> None:
    array = predict_like(image_path, pred_path).astype(np.float32)
    array.flat[3] = np.nan
    g = read_geometry(image_path)
    sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))


def _probabilities(image_path: Path, pred_path: Path) -> None:
    g = read_geometry(image_path)
    array = np.random.default_rng(0).random(g.size[::-1]).astype(np.float32)
    sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))


def _wrong_direction(image_path: Path, pred_path: Path) -> None:
    g = read_geometry(image_path)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))
    flipped = tuple(-d if i == 0 else d for i, d in enumerate(g.direction))
    sitk.WriteImage(_image(array, g.spacing, g.origin, flipped), str(pred_path))


def _not_an_image(image_path: Path, pred_path: Path) -> None:
    pred_path.write_bytes(b"this is not a NIfTI file")


def _not_gzip(image_path: Path, pred_path: Path) -> None:
    """A valid NIfTI under a .nii.gz name, uncompressed: the archive entry would not gunzip."""
    pred_path.write_bytes(gzip.decompress(pred_path.read_bytes()))


def _wrong_size(image_path: Path, pred_path: Path) -> None:
    """One slice short, the header's spacing, origin and direction right: a crop nnU-Net never writes."""
    g = read_geometry(image_path)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))[:-1]
    sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))


def _signed_with(value: int, dtype):
    def breaker(image_path: Path, pred_path: Path) -> None:
        array = predict_like(image_path, pred_path).astype(dtype)
        array.flat[2] = value
        g = read_geometry(image_path)
        sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))
    return breaker


def _one_fractional_voxel(image_path: Path, pred_path: Path) -> None:
    array = predict_like(image_path, pred_path).astype(np.float32)
    array.flat[4] = 0.5
    g = read_geometry(image_path)
    sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))


def _two_components(image_path: Path, pred_path: Path) -> None:
    g = read_geometry(image_path)
    volume = _image(np.zeros(g.size[::-1], np.uint8), g.spacing, g.origin, g.direction)
    sitk.WriteImage(sitk.Compose(volume, volume), str(pred_path))


def _short_data(image_path: Path, pred_path: Path) -> None:
    """A whole gzip stream around a cut NIfTI: ITK reads the missing voxels as 0."""
    pred_path.write_bytes(gzip.compress(gzip.decompress(pred_path.read_bytes())[:-20]))


@pytest.mark.parametrize("breaker, phrase", [
    (_wrong_spacing, "spacing (x, y, z) expected"),
    (_unknown_label, "label values [2] are not in dataset.json labels"),
    (_four_d, "has 4 dimensions"),
    (_float_nan, "1 NaN"),
    (_probabilities, "not integers"),
    (_wrong_direction, "direction expected"),
    (_not_an_image, "cannot be read"),
    (_not_gzip, "not gzip-compressed"),
    (_short_data, "truncated: the decompressed data holds"),
    (_wrong_size, "size (x, y, z) expected (6, 8, 5), got (6, 8, 4)"),
    (_signed_with(-1, np.int8), "label values [-1] are not in dataset.json labels"),
    (_signed_with(-1, np.int16), "label values [-1] are not in dataset.json labels"),
    (_one_fractional_voxel, "not integers (e.g. 0.5, 1 voxels)"),
    (_two_components, "has 2 components per voxel"),
    (_trailing_singleton, "dimensions (6, 8, 5, 1): ITK drops the trailing ones of size 1"),
    (_image_intensities, "distinct values look like image intensities, not labels: is this a test image"),
], ids=["spacing", "label", "4d", "nan", "probabilities", "direction", "unreadable", "not_gzip",
        "short_data", "size", "negative_int8", "negative_int16", "one_fractional", "vector", "trailing_1",
        "intensities"])
def test_invalid_case_is_named_with_reason_and_nothing_written(spleen, capsys, breaker, phrase):
    task, pred, predictions, out = spleen
    breaker(task / "imagesTs" / "spleen_3.nii.gz", pred / "spleen_3.nii.gz")
    report = validate_task(task, pred, progress=False)
    assert [r.case for r in report.invalid] == ["spleen_3.nii.gz"]
    assert any(phrase in reason for reason in report.invalid[0].reasons), report.invalid[0].reasons
    assert sorted(r.case for r in report.found) == ["spleen_1.nii.gz", "spleen_5.nii.gz"]
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.tar.gz")]) == 1
    printed = capsys.readouterr().out
    assert "INVALID spleen_3.nii.gz" in printed and phrase in printed
    assert_nothing_written(out)


def _cut(path: Path, keep: float = 2 / 3) -> None:
    """What an interrupted copy or write leaves: the first part of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32], ids=["uint8", "float32"])
def test_truncated_gzip_prediction_is_invalid_and_nothing_written(spleen, capsys, dtype):
    """ITK reads a cut .nii.gz as zeros (uint8 passed, and was packed byte for byte); nibabel's
    NaN check raised a bare EOFError on a float one. Both are now an invalid case."""
    task, pred, _, out = spleen
    name = "spleen_3.nii.gz"
    predict_like(task / "imagesTs" / name, pred / name, dtype=dtype)
    _cut(pred / name)
    report = validate_task(task, pred, progress=False)
    assert [r.case for r in report.invalid] == [name]
    (reason,) = report.invalid[0].reasons
    assert "truncated: the gzip stream ends before its end marker" in reason
    assert "re-run nnUNetv2_predict" in reason
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.zip")]) == 1
    printed = capsys.readouterr()
    assert f"INVALID {name}: truncated" in printed.out and "Traceback" not in printed.err
    assert_nothing_written(out)
    with pytest.raises(IncompleteSubmissionError):
        write_submission([(task, pred)], out / "s.zip", progress=False)
    assert_nothing_written(out)


def test_prediction_cut_after_validation_is_not_packed(spleen):
    task, pred, _, out = spleen
    report = validate_task(task, pred, progress=False)
    assert report.complete
    _cut(pred / "spleen_5.nii.gz")
    with pytest.raises(ValueError, match="spleen_5.nii.gz.*truncated.*nothing written"):
        write_submission([report], out / "s.zip", progress=False)
    assert_nothing_written(out)


def test_spacing_reason_states_expected_and_got(spleen):
    task, pred, _, _ = spleen
    _wrong_spacing(task / "imagesTs" / "spleen_3.nii.gz", pred / "spleen_3.nii.gz")
    reference = read_geometry(task / "imagesTs" / "spleen_3.nii.gz")
    (reason,) = validate_task(task, pred, progress=False).invalid[0].reasons
    assert f"{reference.spacing[2]:.6g}" in reason and f"{reference.spacing[2] * 1.5:.6g}" in reason


def test_geometry_within_tolerance_is_accepted(spleen):
    task, pred, _, _ = spleen
    g = read_geometry(task / "imagesTs" / "spleen_1.nii.gz")
    image = _image(np.zeros(g.size[::-1], np.uint8), tuple(s * (1 + 1e-6) for s in g.spacing),
                   tuple(o + 1e-6 for o in g.origin), g.direction)
    assert check_prediction(image, g, {0, 1}) == ([], [])
    shifted = _image(np.zeros(g.size[::-1], np.uint8), g.spacing,
                     tuple(o + 0.01 for o in g.origin), g.direction)
    assert any("origin (x, y, z) expected" in r for r in check_prediction(shifted, g, {0, 1})[0])


def test_allow_incomplete_writes_valid_subset_and_says_what_is_missing(spleen, capsys):
    task, pred, predictions, out = spleen
    (pred / "spleen_3.nii.gz").unlink()
    _unknown_label(task / "imagesTs" / "spleen_5.nii.gz", pred / "spleen_5.nii.gz")
    archive_path = out / "s.zip"
    assert main(["--task", str(task), str(pred), "-o", str(archive_path),
                 "--allow-incomplete"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 3 cases" in printed
    assert "Task09_Spleen/spleen_3.nii.gz: missing" in printed
    assert "Task09_Spleen/spleen_5.nii.gz: invalid" in printed
    with zipfile.ZipFile(archive_path) as archive:
        assert [n for n in archive.namelist() if not n.endswith("/")] == \
            ["Task09_Spleen/spleen_1.nii.gz"]


def test_no_valid_prediction_at_all_writes_nothing_even_when_incomplete_is_allowed(spleen):
    task, pred, _, out = spleen
    for prediction in pred.iterdir():
        prediction.unlink()
    with pytest.raises(IncompleteSubmissionError, match="No valid prediction in any task"):
        write_submission([(task, pred)], out / "s.zip", allow_incomplete=True, progress=False)
    assert_nothing_written(out)


def test_image_intensities_are_listed_in_one_short_line(spleen):
    """imagesTs given as the predictions printed one line of thousands of values."""
    task, pred, _, _ = spleen
    _image_intensities(task / "imagesTs" / "spleen_3.nii.gz", pred / "spleen_3.nii.gz")
    (reason,) = validate_task(task, pred, progress=False).invalid[0].reasons
    assert len(reason) < 400 and ", ...] (" in reason and " values)" in reason


def test_converted_nnunet_dataset_given_as_the_task_names_the_msd_folder_to_give(spleen, tmp_path, capsys):
    """nnU-Net's DatasetXXX (converted) has other image names than the MSD task: every prediction was reported
    MISSING under the image names and ignored."""
    _, pred, _, out = spleen
    converted = tmp_path / "nnUNet_raw" / "Dataset009_Spleen"
    (converted / "imagesTs").mkdir(parents=True)
    (converted / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                        "labels": {"background": 0, "spleen": 1}}))
    assert main(["--task", str(converted), str(pred), "-o", str(out / "s.zip")]) == 2
    err = capsys.readouterr().err
    assert f"{converted} is an nnU-Net dataset" in err and "the original MSD task folder (TaskNN_Name" in err
    assert_nothing_written(out)


def test_prediction_path_that_is_a_file_and_archive_names_that_cannot_be_written(spleen, capsys, monkeypatch):
    from nnunet_logonet.msd import submission

    task, pred, _, out = spleen
    assert main(["--task", str(task), str(pred / "spleen_1.nii.gz"), "-o", str(out / "s.zip")]) == 2
    assert "spleen_1.nii.gz (for Task09_Spleen) is a file; give the folder" in capsys.readouterr().err
    assert main(["--task", str(task), str(pred), "-o", str(out / ".zip")]) == 2
    assert "has no name before .zip (it would be a hidden file)" in capsys.readouterr().err
    monkeypatch.setattr(submission.os, "access", lambda path, mode: False)
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.zip")]) == 2
    assert f"Folder {out} for the archive cannot be written to" in capsys.readouterr().err
    monkeypatch.undo()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(submission, "_archive_writer", full_disk)
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.zip")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out / 's.zip'}: No space left on device" in err
    assert_nothing_written(out)


def test_archive_path_that_is_a_folder_is_refused_before_validation(spleen):
    task, pred, _, out = spleen
    (out / "s.zip").mkdir()
    with pytest.raises(ValueError, match="s.zip is a folder"):
        write_submission([(task, pred)], out / "s.zip", overwrite=True, progress=False)
    assert (out / "s.zip").is_dir()


def test_existing_archive_not_overwritten_without_flag(spleen, capsys):
    task, pred, _, out = spleen
    archive_path = out / "s.zip"
    archive_path.write_bytes(b"previous submission")
    assert main(["--task", str(task), str(pred), "-o", str(archive_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert archive_path.read_bytes() == b"previous submission"
    with pytest.raises(FileExistsError):
        write_submission([(task, pred)], archive_path, progress=False)
    assert main(["--task", str(task), str(pred), "-o", str(archive_path), "--overwrite"]) == 0
    assert zipfile.is_zipfile(archive_path)
    assert sorted(p.name for p in out.iterdir()) == ["s.zip"]


def test_two_tasks_in_one_tar_gz(spleen, tmp_path):
    task, pred, _, out = spleen
    heart = make_msd_task(tmp_path / "msd", "Task02_Heart", "la", HEART_LABELS, n_test=2, seed=1)
    heart_predictions = predict_all(heart, tmp_path / "pred_heart")
    path = write_submission([(task, pred), (heart, tmp_path / "pred_heart")], out / "all.tar.gz",
                            progress=False)
    with tarfile.open(path) as archive:
        files = sorted(m.name for m in archive.getmembers() if m.isfile())
        folders = sorted(m.name for m in archive.getmembers() if m.isdir())
    assert folders == ["Task02_Heart", "Task09_Spleen"]
    assert files == sorted([f"Task02_Heart/{n}" for n in heart_predictions]
                           + [f"Task09_Spleen/spleen_{i}.nii.gz" for i in (1, 3, 5)])


def test_tar_archive_holds_the_files_behind_links_and_the_task_name_given(spleen, tmp_path):
    """Predictions gathered with `ln -s` went into a .tar.gz as links to this machine's files, and a
    task folder reached through a link gave the archive the link target's name."""
    task, pred, predictions, out = spleen
    linked = tmp_path / "linked_pred"
    linked.mkdir()
    for name in predictions:
        (linked / name).symlink_to(pred / name)
    renamed = task.rename(tmp_path / "msd" / "spleen_v2")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "Task09_Spleen").symlink_to(renamed)
    path = write_submission([(tmp_path / "links" / "Task09_Spleen", linked)], out / "s.tar.gz", progress=False)
    with tarfile.open(path) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(n for n, m in members.items() if m.isfile()) == \
            [f"Task09_Spleen/{n}" for n in sorted(predictions)]
        assert not any(m.issym() or m.islnk() for m in members.values())
        data = archive.extractfile(f"Task09_Spleen/{sorted(predictions)[0]}").read()
    assert data == (pred / sorted(predictions)[0]).read_bytes()
    assert renamed.is_dir()


def test_same_task_twice_is_refused(spleen):
    task, pred, _, out = spleen
    with pytest.raises(ValueError, match="more than once"):
        write_submission([(task, pred), (task, pred)], out / "s.zip", progress=False)
    assert_nothing_written(out)


@pytest.mark.parametrize("rename, convention", [
    (lambda name: name, "MSD file name"),
    (lambda name: name.replace(".nii.gz", "_0000.nii.gz"), "channel suffix _0000"),
    (lambda name: name.replace("spleen_", "spleen_00"), "zero padding"),
], ids=["nnunet_predict", "channel_suffix", "renumbered"])
def test_converted_names_are_mapped_back_to_msd_names(tmp_path, rename, convention):
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS)
    predictions = predict_all(task, tmp_path / "pred", rename=rename)
    report = validate_task(task, tmp_path / "pred", progress=False)
    assert report.complete and convention in report.convention
    path = write_submission([report], tmp_path / "s.zip", progress=False)
    with zipfile.ZipFile(path) as archive:
        for name, expected in predictions.items():
            image = read_zip_member(archive, f"Task09_Spleen/{name}", tmp_path)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)


def test_two_files_for_one_case_are_ambiguous(spleen):
    task, pred, _, _ = spleen
    predict_like(task / "imagesTs" / "spleen_1.nii.gz", pred / "spleen_1_0000.nii.gz")
    report = validate_task(task, pred, progress=False)
    assert [r.case for r in report.invalid] == ["spleen_1.nii.gz"]
    assert "spleen_1_0000.nii.gz" in report.invalid[0].reasons[0]


def test_integral_float_and_int32_predictions_are_written_as_uint8(spleen, tmp_path):
    task, pred, predictions, out = spleen
    for name, dtype in (("spleen_1.nii.gz", np.float32), ("spleen_3.nii.gz", np.int32)):
        predictions[name] = predict_like(task / "imagesTs" / name, pred / name, dtype=dtype)
    report = validate_task(task, pred, progress=False)
    assert report.complete
    assert any("written as uint8" in n for r in report.found for n in r.notes)
    with zipfile.ZipFile(write_submission([report], out / "s.zip", progress=False)) as archive:
        for name, expected in predictions.items():
            image = read_zip_member(archive, f"Task09_Spleen/{name}", tmp_path)
            assert image.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)


def test_test_list_falls_back_to_imagesTs_and_skips_macos_files(tmp_path):
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS,
                         list_test=False)
    predict_all(task, tmp_path / "pred")
    (task / "imagesTs" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "pred" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # copied from a Mac
    report = validate_task(task, tmp_path / "pred", progress=False)
    assert report.test_list_source == "imagesTs/"
    assert report.expected == ["spleen_1.nii.gz", "spleen_3.nii.gz", "spleen_5.nii.gz"]
    assert report.complete and report.unexpected == []


def test_nan_in_an_uncompressed_nii_prediction_is_invalid(spleen):
    """ITK reads NaN as 0, so the file itself is read again with nibabel, for .nii as for .nii.gz."""
    task, pred, _, _ = spleen
    (pred / "spleen_3.nii.gz").unlink()
    _float_nan(task / "imagesTs" / "spleen_3.nii.gz", pred / "spleen_3.nii")
    report = validate_task(task, pred, progress=False)
    assert [r.case for r in report.invalid] == ["spleen_3.nii.gz"]
    assert any("1 NaN" in reason for reason in report.invalid[0].reasons), report.invalid[0].reasons


def test_dataset_json_labels_in_either_form_and_test_lists_checked(tmp_path):
    from nnunet_logonet.msd.task import parse_labels, read_task

    assert parse_labels({"background": 0, "spleen": 1}, "x") == {0: "background", 1: "spleen"}  # nnU-Net's form
    with pytest.raises(ValueError, match="cannot read label entry 'a': True"):
        parse_labels({"a": True}, "x")
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS)
    meta = json.loads((task / "dataset.json").read_text())

    def refused(test, match):
        (task / "dataset.json").write_text(json.dumps({**meta, "test": test}))
        with pytest.raises(ValueError, match=match):
            read_task(task)

    refused(meta["test"] + meta["test"][:1], r"lists \['spleen_1.nii.gz'\] more than once")
    (task / "imagesTs" / "spleen_5.nii.gz").unlink()
    refused(meta["test"], r"Test images listed in .*dataset.json are missing: .*spleen_5.nii.gz")
    for image in (task / "imagesTs").iterdir():
        image.unlink()
    refused([], "No test cases in")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_one_byte_short_is_truncated(tmp_path, suffix):
    """ITK reads the missing voxels as 0; the byte count against the header catches even one byte."""
    from nnunet_logonet.nifti import file_damage

    path = tmp_path / f"case{suffix}"
    sitk.WriteImage(_image(np.ones((4, 5, 6), np.uint8), (1.0, 1.0, 1.0), (0, 0, 0)), str(path))
    assert file_damage(path) is None
    data = gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes()
    path.write_bytes(gzip.compress(data[:-1]) if suffix == ".nii.gz" else data[:-1])
    assert file_damage(path).startswith("truncated")


def test_output_pixel_type_is_uint8_up_to_label_255():
    from nnunet_logonet.msd.validation import output_pixel_type

    assert output_pixel_type({0: "background", 255: "x"}) == sitk.sitkUInt8
    assert output_pixel_type({0: "background", 256: "x"}) == sitk.sitkUInt16


def test_four_d_multimodal_test_images_expect_3d_predictions(tmp_path):
    task = make_msd_task(tmp_path / "msd", "Task05_Prostate", "prostate",
                         {"0": "background", "1": "PZ", "2": "TZ"}, n_test=2, channels=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, image in enumerate(test_cases(task)):
        predict_like(image, pred / image.name, labels=(0, 1, 2), seed=i)
    assert validate_task(task, pred, progress=False).complete


def test_bad_task_folder_and_archive_name_are_clear_errors(spleen, tmp_path, capsys):
    task, pred, _, out = spleen
    assert main(["--task", str(tmp_path / "nope"), str(pred), "-o", str(out / "s.zip")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["--task", str(task), str(pred), "-o", str(out / "s.rar")]) == 2
    assert ".zip" in capsys.readouterr().err
    assert_nothing_written(out)


def test_predictions_named_as_after_nnunet_conversion_are_accepted(tmp_path):
    """The real ``nnUNetv2_convert_MSD_dataset``, then outputs named and written exactly as
    ``nnUNetv2_predict`` does (case id = image name minus ``_0000.nii.gz``; nnU-Net's
    ``SimpleITKIO.write_seg`` with the properties read from the converted images)."""
    import os
    import subprocess
    import sys

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    spleen = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS)
    prostate = make_msd_task(tmp_path / "msd", "Task05_Prostate", "prostate",
                             {"0": "background", "1": "PZ", "2": "TZ"}, n_test=2, channels=2)
    env = {**os.environ, **{name: str(tmp_path / name) for name in
                            ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    command = Path(sys.executable).parent / "nnUNetv2_convert_MSD_dataset"
    pairs = []
    for task, dataset, n_labels in ((spleen, "Dataset009_Spleen", 2),
                                    (prostate, "Dataset005_Prostate", 3)):
        subprocess.run([str(command), "-i", str(task), "-np", "1"], env=env, check=True,
                       capture_output=True)
        images_ts = tmp_path / "nnUNet_raw" / dataset / "imagesTs"
        output = tmp_path / f"pred_{dataset}"
        output.mkdir()
        io = SimpleITKIO()
        for i, files in enumerate(create_lists_from_splitted_dataset_folder(str(images_ts),
                                                                          ".nii.gz")):
            case_id = os.path.basename(files[0])[: -len("_0000.nii.gz")]
            data, properties = io.read_images(files)
            seg = np.random.default_rng(i).integers(0, n_labels, size=data.shape[1:])
            io.write_seg(seg, str(output / f"{case_id}.nii.gz"), properties)
        pairs.append(validate_task(task, output, progress=False))
    assert all(report.complete for report in pairs), [report.format() for report in pairs]
    assert all("MSD file name" in report.convention for report in pairs)
    path = write_submission(pairs, tmp_path / "submission.zip", progress=False)
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))
    assert names == sorted([f"Task09_Spleen/{p.name}" for p in test_cases(spleen)]
                           + [f"Task05_Prostate/{p.name}" for p in test_cases(prostate)])


def test_unusual_task_folder_name_is_warned_but_used(tmp_path, capsys):
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen_v2", "spleen", SPLEEN_LABELS, n_test=1)
    predict_all(task, tmp_path / "pred")
    assert main(["--task", str(task), str(tmp_path / "pred"), "-o", str(tmp_path / "s.zip")]) == 0
    assert "does not look like an MSD task" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "s.zip") as archive:
        assert "Task09_Spleen_v2/spleen_1.nii.gz" in archive.namelist()


def test_archive_gets_the_usual_permissions_and_a_killed_runs_part_file_is_removed(spleen):
    """mkstemp's files are readable by their owner only, and the rename kept that (a submission shared with
    a team could not be read); a SIGKILL between creating the temporary file and renaming it left a
    hidden .part file as large as the archive, which no later run removed."""
    import os

    task, pred, _, out = spleen
    killed = out / ".s.zip.99999999-abcd_123.part"  # a pid above Linux's pid_max: that run is gone
    killed.write_bytes(b"PK half an archive")
    live = out / f".s.zip.{os.getpid()}-abcd_123.part"  # a run still writing is left alone
    live.write_bytes(b"")
    umask = os.umask(0o022)
    try:
        write_submission([validate_task(task, pred, progress=False)], out / "s.zip", progress=False)
    finally:
        os.umask(umask)
    assert sorted(p.name for p in out.iterdir()) == sorted(["s.zip", live.name])
    assert (out / "s.zip").stat().st_mode & 0o777 == 0o644


def test_names_match_only_where_one_test_case_fits():
    """A prediction is given to a test case by its MSD name, the nnU-Net channel-0 name, or the same case
    number with other zero padding only where that number is one case's; anything else is left unmatched,
    never guessed (another channel's image, a number two cases share)."""
    from nnunet_logonet.msd.naming import match_predictions

    expected = ["spleen_1.nii.gz", "spleen_2.nii.gz", "liver_7.nii.gz", "liver_07.nii.gz"]
    files = [Path(n) for n in ("spleen_1.nii.gz", "spleen_2_0000.nii.gz", "spleen_1_0001.nii.gz",
                               "liver_007.nii.gz", "spleen_9.nii.gz")]
    found = match_predictions(expected, files)
    assert found.files == {"spleen_1.nii.gz": Path("spleen_1.nii.gz"), "spleen_2.nii.gz": Path("spleen_2_0000.nii.gz")}
    assert found.conventions == {"spleen_1.nii.gz": "msd", "spleen_2.nii.gz": "nnunet_channel"}
    assert sorted(p.name for p in found.unexpected) == ["liver_007.nii.gz", "spleen_1_0001.nii.gz", "spleen_9.nii.gz"]
    renumbered = match_predictions(["spleen_1.nii.gz", "spleen_12.nii.gz"], [Path("spleen_001.nii.gz")])
    assert renumbered.files == {"spleen_1.nii.gz": Path("spleen_001.nii.gz")}
    assert renumbered.conventions == {"spleen_1.nii.gz": "renumbered"}


def test_uncompressed_nii_predictions_go_into_the_archive_compressed_under_msd_names(tmp_path):
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS)
    predictions = predict_all(task, tmp_path / "pred", rename=lambda name: name.replace(".nii.gz", ".nii"))
    report = validate_task(task, tmp_path / "pred", progress=False)
    assert report.complete and "uncompressed .nii" in report.convention
    with zipfile.ZipFile(write_submission([report], tmp_path / "s.zip", progress=False)) as archive:
        files = sorted(n for n in archive.namelist() if not n.endswith("/"))
        assert files == sorted(f"Task09_Spleen/{name}" for name in predictions)
        for name, expected in predictions.items():
            assert archive.read(f"Task09_Spleen/{name}")[:2] == b"\x1f\x8b"  # gzip, as the name says
            image = read_zip_member(archive, f"Task09_Spleen/{name}", tmp_path)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)


def test_a_label_above_255_is_written_as_uint16(tmp_path):
    task = make_msd_task(tmp_path / "msd", "Task99_Wide", "wide", {"0": "background", "1": "a", "300": "b"})
    (tmp_path / "pred").mkdir()
    predictions = {image.name: predict_like(image, tmp_path / "pred" / image.name, labels=(0, 1, 300), seed=i,
                                            dtype=np.int32) for i, image in enumerate(test_cases(task))}
    report = validate_task(task, tmp_path / "pred", progress=False)
    assert report.complete and any("written as uint16" in n for r in report.found for n in r.notes)
    with zipfile.ZipFile(write_submission([report], tmp_path / "s.zip", progress=False)) as archive:
        for name, expected in predictions.items():
            image = read_zip_member(archive, f"Task99_Wide/{name}", tmp_path)
            assert image.GetPixelID() == sitk.sitkUInt16
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar"])
def test_tgz_and_tar_archive_names_are_written_as_such(spleen, suffix):
    task, pred, predictions, out = spleen
    assert main(["--task", str(task), str(pred), "-o", str(out / f"submission{suffix}")]) == 0
    with tarfile.open(out / f"submission{suffix}") as archive:  # "r:*": gzip detected, or plain tar
        assert sorted(m.name for m in archive.getmembers() if m.isfile()) == \
            sorted(f"Task09_Spleen/{name}" for name in predictions)
        assert [(m.name, m.mode) for m in archive.getmembers() if m.isdir()] == [("Task09_Spleen", 0o755)]
    assert ((out / f"submission{suffix}").read_bytes()[:2] == b"\x1f\x8b") == (suffix != ".tar")


def test_the_module_runs_as_a_script_without_runpys_warning():
    """`python -m nnunet_logonet.msd.submission` warned that the package had imported the module already."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "nnunet_logonet.msd.submission", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "usage" in run.stdout and "RuntimeWarning" not in run.stderr


def test_report_says_incomplete_and_names_ignored_files(spleen):
    task, pred, _, _ = spleen
    (pred / "spleen_3.nii.gz").unlink()
    (pred / "spleen_9.nii.gz").write_bytes((pred / "spleen_1.nii.gz").read_bytes())  # no such test case
    text = validate_task(task, pred, progress=False).format()
    assert "[INCOMPLETE]" in text.splitlines()[0]
    assert "MISSING spleen_3.nii.gz" in text
    assert "ignored 1 file(s) matching no test case: spleen_9.nii.gz" in text


def test_report_shows_ten_notes_and_counts_the_rest(tmp_path):
    from nnunet_logonet.msd.validation import CaseResult, TaskReport

    found = [CaseResult(f"c_{i}.nii.gz", tmp_path / f"c_{i}.nii.gz", notes=("written as uint8",)) for i in range(12)]
    report = TaskReport("Task09_Spleen", tmp_path, tmp_path, {0: "background"}, [r.case for r in found],
                        found=found)
    lines = report.format().splitlines()
    assert "[complete]" in lines[0]
    assert sum(line.startswith("  note ") for line in lines) == 10 and lines[-1] == "  ... 2 more notes"


def test_a_prediction_found_under_another_name_is_noted(tmp_path):
    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS)
    predict_all(task, tmp_path / "pred", rename=lambda name: name.replace(".nii.gz", "_0000.nii.gz"))
    report = validate_task(task, tmp_path / "pred", progress=False)
    assert [n for r in report.found for n in r.notes] == \
        [f"found as spleen_{i}_0000.nii.gz" for i in (1, 3, 5)]
    predict_all(task, tmp_path / "msd_names")
    assert [r.notes for r in validate_task(task, tmp_path / "msd_names", progress=False).found] == [()] * 3


def test_spacing_off_by_one_in_a_thousand_is_refused(spleen):
    task, _, _, _ = spleen
    g = read_geometry(task / "imagesTs" / "spleen_1.nii.gz")
    image = _image(np.zeros(g.size[::-1], np.uint8), tuple(s * 1.001 for s in g.spacing), g.origin, g.direction)
    assert any("spacing (x, y, z) expected" in r for r in check_prediction(image, g, {0, 1})[0])


def test_a_2d_prediction_is_a_finding_not_a_crash(spleen):
    task, _, _, _ = spleen
    g = read_geometry(task / "imagesTs" / "spleen_1.nii.gz")
    reasons, _ = check_prediction(sitk.GetImageFromArray(np.zeros(g.size[1::-1], np.uint8)), g, {0, 1})
    assert len(reasons) == 1 and reasons[0].startswith("has 2 dimensions")


def test_integral_float64_map_is_accepted_and_noted(spleen):
    task, _, _, _ = spleen
    g = read_geometry(task / "imagesTs" / "spleen_1.nii.gz")
    image = _image(np.ones(g.size[::-1], np.float64), g.spacing, g.origin, g.direction)
    reasons, notes = check_prediction(image, g, {0, 1})
    assert reasons == [] and len(notes) == 1 and "written as uint8" in notes[0]


def test_inf_in_a_float_prediction_is_invalid(spleen):
    """ITK reads +-inf as 0, like NaN; only nibabel's count of the file shows them."""
    task, pred, _, _ = spleen
    image_path, pred_path = task / "imagesTs" / "spleen_3.nii.gz", pred / "spleen_3.nii.gz"
    array = predict_like(image_path, pred_path).astype(np.float32)
    array.flat[3] = np.inf
    g = read_geometry(image_path)
    sitk.WriteImage(_image(array, g.spacing, g.origin, g.direction), str(pred_path))
    report = validate_task(task, pred, progress=False)
    assert [r.case for r in report.invalid] == ["spleen_3.nii.gz"]
    assert any("0 NaN and 1 inf" in reason for reason in report.invalid[0].reasons), report.invalid[0].reasons


def test_float_values_near_an_integer_are_not_integers(spleen):
    """A cast to uint8 would truncate 0.999 to 0: only exact integers are labels."""
    task, _, _, _ = spleen
    g = read_geometry(task / "imagesTs" / "spleen_1.nii.gz")
    array = np.ones(g.size[::-1], np.float32)
    array.flat[0] = np.float32(0.999)
    reasons, _ = check_prediction(_image(array, g.spacing, g.origin, g.direction), g, {0, 1})
    assert any("not integers (e.g. 0.999, 1 voxels)" in r for r in reasons), reasons


def test_unreadable_prediction_reason_is_itks_message_not_its_source_line(spleen):
    task, pred, _, _ = spleen
    _not_an_image(task / "imagesTs" / "spleen_3.nii.gz", pred / "spleen_3.nii.gz")
    (reason,) = validate_task(task, pred, progress=False).invalid[0].reasons
    assert reason.startswith("cannot be read as an image: Unable to determine ImageIO reader"), reason
    assert ".cxx" not in reason


def test_missing_prediction_folder_is_a_clear_error(spleen, tmp_path):
    task, _, _, _ = spleen
    with pytest.raises(ValueError, match=r"Prediction folder .*nope \(for Task09_Spleen\) does not exist"):
        validate_task(task, tmp_path / "nope", progress=False)


def _break_task(task: Path, how: str) -> Path:
    meta = json.loads((task / "dataset.json").read_text())
    if how == "no_folder":
        return task.parent / "Task99_Absent"
    if how == "no_json":
        (task / "dataset.json").unlink()
    elif how == "bad_json":
        (task / "dataset.json").write_text("{")
    elif how == "no_test_list_nor_imagesTs":
        for image in (task / "imagesTs").iterdir():
            image.unlink()
        (task / "imagesTs").rmdir()
        (task / "dataset.json").write_text(json.dumps({**meta, "test": []}))
    else:
        changed = {"no_labels": {k: v for k, v in meta.items() if k != "labels"},
                   "empty_labels": {**meta, "labels": {}},
                   "test_entry_not_a_path": {**meta, "test": [{"image": meta["test"][0]}]}}[how]
        (task / "dataset.json").write_text(json.dumps(changed))
    return task


@pytest.mark.parametrize("how, message", [
    ("no_folder", r"MSD task folder .*Task99_Absent does not exist"),
    ("no_json", r"dataset.json is missing; --task must be an MSD task folder"),
    ("bad_json", r"dataset.json is not valid JSON"),
    ("no_labels", r'dataset.json has no "labels" entry'),
    ("empty_labels", r'dataset.json: "labels" must be a non-empty mapping'),
    ("test_entry_not_a_path", r'dataset.json: "test" entries must be file paths'),
    ("no_test_list_nor_imagesTs", r'lists no "test" cases and .*imagesTs does not exist'),
])
def test_a_broken_task_folder_is_a_value_error_naming_the_file(tmp_path, how, message):
    from nnunet_logonet.msd.task import read_task

    task = _break_task(make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS, n_test=1), how)
    with pytest.raises(ValueError, match=message):
        read_task(task)


def test_unreadable_or_2d_test_image_header_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Cannot read image header of test image .*bad.nii.gz"):
        read_geometry(bad)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(flat))
    with pytest.raises(ValueError, match=r"flat.nii.gz has 2 dimensions; expected 3"):
        read_geometry(flat)


def test_test_list_fallback_skips_underscore_files_as_nnunets_converter_does(tmp_path):
    from nnunet_logonet.msd.task import read_task

    task = make_msd_task(tmp_path / "msd", "Task09_Spleen", "spleen", SPLEEN_LABELS, list_test=False)
    (task / "imagesTs" / "_spleen_1.nii.gz").write_bytes((task / "imagesTs" / "spleen_1.nii.gz").read_bytes())
    assert list(read_task(task).test_images) == ["spleen_1.nii.gz", "spleen_3.nii.gz", "spleen_5.nii.gz"]
