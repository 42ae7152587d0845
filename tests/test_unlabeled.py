"""logonet_prepare_unlabeled: an image-only nnU-Net raw dataset from NIfTI folders, and every bad input."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_logonet.ssl.unlabeled import UnlabeledDataError, body_mask, find_cases, main, prepare_unlabeled

SHAPE = (12, 20, 24)  # numpy order (z, y, x)


def ct_volume(seed=0):
    """Air (-1000) with a body cylinder (40 HU) holding an enclosed air pocket, and a separate small object."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[(y - 10) ** 2 + (x - 10) ** 2 <= 49] = 40.0
    volume[3:9, 8:12, 8:12] = -950.0  # enclosed pocket: inside the body
    volume[4:8, 1:3, 20:23] = 200.0  # separate object (table): not the body
    return volume + rng.normal(0, 5, SHAPE).astype(np.float32)


def write(path, array, spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 3.0)):
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing(spacing[: image.GetDimension()] + (1.0,) * (image.GetDimension() - len(spacing)))
    image.SetOrigin(origin[: image.GetDimension()] + (0.0,) * (image.GetDimension() - len(origin)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


@pytest.fixture
def raw(tmp_path, monkeypatch):
    root = tmp_path / "nnUNet_raw"
    monkeypatch.setenv("nnUNet_raw", str(root))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    return root


def leftovers(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_happy_path_writes_an_nnunet_dataset(tmp_path, raw, capsys):
    write(tmp_path / "a" / "case1.nii.gz", ct_volume(1))
    write(tmp_path / "b" / "case2_0000.nii.gz", ct_volume(2))
    write(tmp_path / "b" / "case3.nii", ct_volume(3))  # uncompressed input is rewritten as .nii.gz

    main(["-i", str(tmp_path / "a"), "-i", str(tmp_path / "b"), "-d", "501"])

    dataset = raw / "Dataset501_Unlabeled"
    assert leftovers(raw) == ["Dataset501_Unlabeled"], "temporary folder left behind"
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "case1_0000.nii.gz", "case2_0000.nii.gz", "case3_0000.nii.gz"]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["case1.nii.gz", "case2.nii.gz", "case3.nii.gz"]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "body": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["logonet_image_only"] is True
    assert "Dataset501_Unlabeled" in capsys.readouterr().out

    for case, seed in (("case1", 1), ("case3", 3)):
        image = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_volume(seed))
        label = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        assert label.GetSpacing() == image.GetSpacing() and label.GetOrigin() == image.GetOrigin()
        mask = sitk.GetArrayFromImage(label)
        assert set(np.unique(mask)) == {0, 1}
        assert mask[5, 10, 10] == 1, "enclosed air pocket should be filled into the body"
        assert mask[5, 2, 21] == 0, "separate object should not be part of the body"
        assert mask[5, 0, 0] == 0 and mask[5, 10, 4] == 1


def test_nnunet_accepts_the_dataset(tmp_path, raw):
    """nnU-Net's own integrity check and fingerprint run on the result (the point of the placeholder labels)."""
    for i in range(2):
        write(tmp_path / "scans" / f"scan{i}.nii.gz", ct_volume(i))
    prepare_unlabeled([tmp_path / "scans"], 502, progress=False)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res")}
    code = ("from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints;"
            "extract_fingerprints([502], num_processes=1, check_dataset_integrity=True)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
    fingerprint = json.loads((tmp_path / "pre" / "Dataset502_Unlabeled" / "dataset_fingerprint.json").read_text())
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert 0 < stats["median"] < 100  # body intensities (40 HU), not air


def test_multichannel_cases_and_channel_names(tmp_path, raw):
    """Channels keep their order and voxels, an uncompressed non-first channel (b_0001.nii) included."""
    for case in ("a", "b"):
        for channel in range(2):
            ending = ".nii" if (case, channel) == ("b", 1) else ".nii.gz"
            write(tmp_path / "in" / f"{case}_{channel:04d}{ending}", ct_volume(channel))
    dataset = prepare_unlabeled([tmp_path / "in"], 503, channel_names=["CT", "PET"], progress=False)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "PET"} and meta["numTraining"] == 2
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"]
    for case in ("a", "b"):
        for channel in range(2):
            image = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_{channel:04d}.nii.gz"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_volume(channel))
    with pytest.raises(UnlabeledDataError, match="one --channel-name per channel"):
        prepare_unlabeled([tmp_path / "in"], 504, progress=False)


def test_case_names_with_digit_suffix_that_are_not_channels(tmp_path):
    write(tmp_path / "in" / "scan_2019.nii.gz", ct_volume())
    write(tmp_path / "in" / "other.nii.gz", ct_volume())
    assert list(find_cases([tmp_path / "in"])) == ["other", "scan_2019"]


def vector_image(path):
    image = sitk.Compose([sitk.GetImageFromArray(ct_volume())] * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def truncated(path):
    write(path, ct_volume())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def recompressed_cut(path):
    """A gzip stream that is whole (CRC fine) around NIfTI data cut short."""
    write(path, ct_volume())
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))


BAD_INPUTS = {
    "4D": (lambda d: write(d / "x" / "four_d.nii.gz", np.zeros((2, *SHAPE), np.float32)), "four_d.nii.gz", "3D"),
    "2D": (lambda d: write(d / "x" / "flat.nii.gz", np.zeros(SHAPE[1:], np.float32)), "flat.nii.gz", "3D"),
    "single slice": (lambda d: write(d / "x" / "slice.nii.gz", np.zeros((1, *SHAPE[1:]), np.float32)), "slice.nii.gz",
                     "3D"),
    "vector voxels": (lambda d: vector_image(d / "x" / "rgb.nii.gz"), "rgb.nii.gz", "values per voxel"),
    "not NIfTI": (lambda d: (d / "x" / "notes.txt").write_text("hello"), "notes.txt", "not a NIfTI"),
    "garbage NIfTI": (lambda d: (d / "x" / "junk.nii.gz").write_bytes(b"junk" * 100), "junk.nii.gz", "cannot be read"),
    "truncated NIfTI": (lambda d: truncated(d / "x" / "cut.nii.gz"), "cut.nii.gz", "cannot be read"),
    # an uncompressed file cut short was read with half its voxels zero-filled
    "truncated .nii": (lambda d: truncated(d / "x" / "cut.nii"), "cut.nii", "truncated: the file holds"),
    "whole gzip of cut data": (lambda d: recompressed_cut(d / "x" / "cut.nii.gz"), "cut.nii.gz",
                               "truncated: the decompressed data holds"),
    "subfolder": (lambda d: (d / "x" / "nested").mkdir(parents=True), "nested", "a folder"),
    "empty folder": (lambda d: (d / "x").mkdir(), "x", "no \\*.nii.gz"),
    "duplicate same folder": (lambda d: (write(d / "x" / "dup.nii.gz", ct_volume()),
                                         write(d / "x" / "dup_0000.nii.gz", ct_volume())), "dup", "Duplicate"),
    "duplicate across folders": (lambda d: write(d / "y" / "good.nii.gz", ct_volume()), "good", "Duplicate"),
    "mixed channels": (lambda d: (write(d / "x" / "two_0000.nii.gz", ct_volume()),
                                  write(d / "x" / "two_0001.nii.gz", ct_volume())), "good", "Mixed channel counts"),
    "channel gap": (lambda d: (write(d / "x" / "gap_0000.nii.gz", ct_volume()),
                               write(d / "x" / "gap_0002.nii.gz", ct_volume())), "gap_0001", "without gaps"),
    "channel grid": (lambda d: (write(d / "x" / "two_0000.nii.gz", ct_volume()),
                                write(d / "x" / "two_0001.nii.gz", ct_volume()[:, :-1]),
                                write(d / "y" / "one_0000.nii.gz", ct_volume()),
                                write(d / "y" / "one_0001.nii.gz", ct_volume())), "two_0001", "one grid"),
    # same size, other voxel spacing: the channels would not overlay
    "channel spacing": (lambda d: (write(d / "x" / "two_0000.nii.gz", ct_volume()),
                                   write(d / "x" / "two_0001.nii.gz", ct_volume(), spacing=(0.8, 0.8, 3.0))),
                        "two_0001", "one grid"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, raw, kind):
    make, named, reason = BAD_INPUTS[kind]
    if kind not in ("channel grid", "channel spacing"):
        write(tmp_path / "x" / "good.nii.gz", ct_volume()) if kind not in ("empty folder",) else None
    make(tmp_path)
    folders = [tmp_path / "x"] + ([tmp_path / "y"] if (tmp_path / "y").exists() else [])
    with pytest.raises(UnlabeledDataError, match=reason) as error:
        prepare_unlabeled(folders, 510, progress=False)
    assert named in str(error.value)
    assert leftovers(raw) == [], f"left behind: {leftovers(raw)}"


def test_existing_dataset_needs_overwrite_and_ids_must_be_unique(tmp_path, raw):
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    prepare_unlabeled([tmp_path / "in"], 520, progress=False)
    write(tmp_path / "in" / "two.nii.gz", ct_volume())
    with pytest.raises(UnlabeledDataError, match="--overwrite"):
        prepare_unlabeled([tmp_path / "in"], 520, progress=False)
    dataset = prepare_unlabeled([tmp_path / "in"], 520, overwrite=True, progress=False)
    assert len(list((dataset / "imagesTr").iterdir())) == 2
    assert leftovers(raw) == ["Dataset520_Unlabeled"]
    with pytest.raises(UnlabeledDataError, match="already used by"):
        prepare_unlabeled([tmp_path / "in"], 520, name="Other", overwrite=True, progress=False)


@pytest.mark.parametrize("variable", ["nnUNet_preprocessed", "nnUNet_results"])
def test_dataset_id_used_in_preprocessed_or_results_is_refused(tmp_path, raw, monkeypatch, variable):
    """An ID already used elsewhere by nnU-Net would mix two datasets' plans or trainings: refused, naming it."""
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    root = tmp_path / variable
    (root / "Dataset520_Other").mkdir(parents=True)
    monkeypatch.setenv(variable, str(root))
    with pytest.raises(UnlabeledDataError, match=rf"already used by .*Dataset520_Other \({variable}\)"):
        prepare_unlabeled([tmp_path / "in"], 520, progress=False)
    assert leftovers(raw) == []


def test_hidden_files_beside_the_scans_are_ignored(tmp_path, raw):
    """macOS leaves .DS_Store and ._scan.nii.gz files in copied folders; they must not stop the run."""
    write(tmp_path / "in" / "scan.nii.gz", ct_volume())
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\0" * 16)
    (tmp_path / "in" / "._scan.nii.gz").write_bytes(b"\0" * 16)
    dataset = prepare_unlabeled([tmp_path / "in"], 521, progress=False)
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 1
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["scan_0000.nii.gz"]


def test_ctrl_c_while_writing_leaves_no_work_folder(tmp_path, raw, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, not an Exception) must still remove the hidden work folder."""
    import nnunetv2.dataset_conversion.generate_dataset_json as gdj

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gdj, "generate_dataset_json", interrupted)
    write(tmp_path / "in" / "scan.nii.gz", ct_volume())
    with pytest.raises(KeyboardInterrupt):
        prepare_unlabeled([tmp_path / "in"], 522, progress=False)
    assert leftovers(raw) == []


@pytest.mark.parametrize("kwargs, reason", [({"dataset_id": 0}, "1..999"), ({"dataset_id": 1000}, "1..999"),
                                            ({"name": "bad name"}, "--name"), ({"name": "a__b"}, "--name"),
                                            ({"channel_names": ["CT", "MR"]}, "channel-name")])
def test_invalid_arguments(tmp_path, raw, kwargs, reason):
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    with pytest.raises(UnlabeledDataError, match=reason):
        prepare_unlabeled([tmp_path / "in"], **{"dataset_id": 530, "progress": False, **kwargs})


def test_missing_nnunet_raw_and_cli_error_exit(tmp_path, monkeypatch, capsys):
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(UnlabeledDataError, match="nnUNet_raw is not set"):
        prepare_unlabeled([tmp_path / "in"], 540, progress=False)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "in" / "readme.md").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["-i", str(tmp_path / "in"), "-d", "540"])
    assert exit_info.value.code == 1
    assert "readme.md" in capsys.readouterr().err


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_body_threshold_must_be_finite(tmp_path, raw, capsys, threshold):
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    with pytest.raises(SystemExit) as exit_info:
        main(["-i", str(tmp_path / "in"), "-d", "550", f"--body-threshold={threshold}"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"--body-threshold must be a finite intensity, got {threshold}" in error and "Traceback" not in error
    assert leftovers(raw) == []


def test_nnunet_raw_that_is_a_file_or_cannot_be_created_is_named(tmp_path, monkeypatch, capsys):
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "file"))
    with pytest.raises(SystemExit) as exit_info:
        main(["-i", str(tmp_path / "in"), "-d", "551"])
    assert exit_info.value.code == 1
    assert f"nnUNet_raw={tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "file" / "raw"))
    with pytest.raises(UnlabeledDataError, match=r"Cannot write into nnUNet_raw=.*file/raw \(Not a directory\)"):
        prepare_unlabeled([tmp_path / "in"], 551, progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_rerun_removes_work_folders_that_a_killed_run_left(tmp_path, raw):
    """SIGKILL skips the cleanup; the next run of the same target removes that target's hidden work folders
    whose process is gone, and keeps a live run's and every other folder."""
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    stale = [".Dataset560_Unlabeled.abcd_123.tmp", ".Dataset560_Unlabeled.99999999-abcd_123.tmp",
             ".Dataset560_Unlabeled.abcd_123.old"]  # an old copy whose deletion an earlier --overwrite left
    kept = [f".Dataset560_Unlabeled.{os.getpid()}-abcd_123.tmp", ".Dataset561_Unlabeled.abcd_123.tmp",
            f".Dataset560_Unlabeled.{os.getpid()}-abcd_123.old"]
    for folder in stale + kept:
        (raw / folder).mkdir(parents=True)
    prepare_unlabeled([tmp_path / "in"], 560, progress=False)
    assert leftovers(raw) == sorted(["Dataset560_Unlabeled", *kept])


def test_body_mask_falls_back_to_the_whole_image_without_foreground():
    image = sitk.GetImageFromArray(np.full(SHAPE, -1000.0, dtype=np.float32))
    with pytest.warns(UserWarning, match="whole image"):
        mask = body_mask(image)
    assert sitk.GetArrayFromImage(mask).all()


def test_body_mask_on_unsigned_images_does_not_wrap_the_threshold():
    array = np.zeros(SHAPE, dtype=np.uint8)
    array[4:8, 5:15, 5:15] = 100
    mask = sitk.GetArrayFromImage(body_mask(sitk.GetImageFromArray(array), threshold=50))
    np.testing.assert_array_equal(mask, (array > 50).astype(np.uint8))


def test_hardlink_links_compressed_inputs_and_rewrites_uncompressed_ones(tmp_path, raw):
    """docs/ssl.md: --hardlink saves the copy of every .nii.gz scan (same file, same inode); an uncompressed
    .nii is still written as a new .nii.gz, and the dataset is the same as a copied one."""
    write(tmp_path / "in" / "case1.nii.gz", ct_volume(1))
    write(tmp_path / "in" / "case2.nii", ct_volume(2))
    main(["-i", str(tmp_path / "in"), "-d", "560", "--hardlink"])
    main(["-i", str(tmp_path / "in"), "-d", "561"])
    linked, copied = raw / "Dataset560_Unlabeled" / "imagesTr", raw / "Dataset561_Unlabeled" / "imagesTr"
    assert os.path.samefile(linked / "case1_0000.nii.gz", tmp_path / "in" / "case1.nii.gz")
    assert not os.path.samefile(copied / "case1_0000.nii.gz", tmp_path / "in" / "case1.nii.gz")
    assert (linked / "case2_0000.nii.gz").stat().st_nlink == 1
    for name in ("case1_0000.nii.gz", "case2_0000.nii.gz"):
        assert (linked / name).read_bytes() == (copied / name).read_bytes()


@pytest.mark.parametrize("dataset_json", ['{"labels": {"background": 0, "liver": 1}}', None, '{"labels": '])
def test_overwrite_never_replaces_a_dataset_this_command_did_not_make(tmp_path, raw, dataset_json):
    """One wrong ID with --overwrite must not delete a labeled dataset's ground truth: refused, naming the file,
    and the folder is left as it was."""
    labeled = raw / "Dataset521_Liver"
    (labeled / "labelsTr").mkdir(parents=True)
    (labeled / "labelsTr" / "case_000.nii.gz").write_bytes(b"ground truth")
    (labeled / "imagesTs").mkdir()
    if dataset_json is not None:
        (labeled / "dataset.json").write_text(dataset_json)
    write(tmp_path / "in" / "one.nii.gz", ct_volume())
    why = {None: "is missing", '{"labels": ': "cannot be read"}.get(dataset_json, 'has no "logonet_image_only": true')
    with pytest.raises(UnlabeledDataError, match=rf"Dataset521_Liver was not made by logonet_prepare_unlabeled "
                                                 rf"\(.*dataset.json {why}.*Choose another -d ID"):
        prepare_unlabeled([tmp_path / "in"], 521, name="Liver", overwrite=True, progress=False)
    assert (labeled / "labelsTr" / "case_000.nii.gz").read_bytes() == b"ground truth"
    assert (labeled / "imagesTs").is_dir() and leftovers(raw) == ["Dataset521_Liver"]
    with pytest.raises(SystemExit):
        main(["-i", str(tmp_path / "in"), "-d", "521", "--name", "Liver", "--overwrite"])
    assert (labeled / "labelsTr" / "case_000.nii.gz").read_bytes() == b"ground truth"
