"""Reading a Medical Segmentation Decathlon task folder: its test cases, labels and geometry.

An MSD task (``Task09_Spleen/``) holds ``imagesTr``, ``labelsTr``, ``imagesTs`` and a
``dataset.json`` whose ``"test"`` entry lists the test images (``"./imagesTs/spleen_1.nii.gz"``)
and whose ``"labels"`` maps label values to names (``{"0": "background", "1": "spleen"}``).
A submission is judged against these, so everything here reads the original task folder, never
nnU-Net's converted copy. Images are only read header-deep: test images can be large and only
their geometry matters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

__all__ = ["Geometry", "MSDTask", "read_geometry", "read_task"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3D image, in SimpleITK order (x, y, z)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


@dataclass(frozen=True)
class MSDTask:
    """What a submission for one task must match."""

    name: str
    folder: Path
    test_images: dict[str, Path]
    """MSD file name (``spleen_1.nii.gz``) -> test image, in ``dataset.json`` order."""
    labels: dict[int, str]
    test_list_source: str
    """``"dataset.json"`` or ``"imagesTs/"`` (fallback when dataset.json lists no test cases)."""


def is_visible_nifti(name: str) -> bool:
    """NIfTI files nnU-Net's MSD converter would take; MSD tarballs ship ``._*`` macOS files."""
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith((".", "_"))


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Geometry from the header only; a 4D MSD image (several modalities) gives its 3D grid.

    nnU-Net's ``nnUNetv2_convert_MSD_dataset`` splits 4D images into 3D channels keeping the
    first three axes of size, spacing, origin and direction, so predictions carry that grid.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ValueError(f"Cannot read image header of test image {path}: {message}") from error
    dimension = reader.GetDimension()
    if dimension not in (3, 4):
        raise ValueError(f"Test image {path} has {dimension} dimensions; expected 3 (or 4 for "
                         f"multi-modal MSD tasks).")
    direction = reader.GetDirection()
    direction_3d = tuple(direction[row * dimension + col] for row in range(3) for col in range(3))
    return Geometry(size=tuple(int(s) for s in reader.GetSize()[:3]),
                    spacing=tuple(reader.GetSpacing()[:3]),
                    origin=tuple(reader.GetOrigin()[:3]),
                    direction=direction_3d)


def parse_labels(labels: dict, source: str | os.PathLike) -> dict[int, str]:
    """Label value -> name, from MSD form (``{"1": "spleen"}``) or nnU-Net v2 form (``{"spleen": 1}``)."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f'{source}: "labels" must be a non-empty mapping, got {labels!r}.')
    parsed: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            parsed[int(key)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            parsed[value] = str(key)
        else:
            raise ValueError(f'{source}: cannot read label entry {key!r}: {value!r}; expected MSD '
                             f'form {{"1": "spleen"}} or nnU-Net form {{"spleen": 1}} (region-based '
                             f'labels are not supported for MSD submissions).')
    return dict(sorted(parsed.items()))


def read_task(task_folder: str | os.PathLike) -> MSDTask:
    """Read an MSD task folder; raise ``ValueError`` naming the file if it is not one."""
    given = Path(os.path.abspath(Path(task_folder).expanduser()))  # '..' folded, links kept
    folder = given.resolve()  # files are read through links; the name is the one given (nnU-Net's converter)
    dataset_json = folder / "dataset.json"
    images_ts = folder / "imagesTs"
    if not folder.is_dir():
        raise ValueError(f"MSD task folder {folder} does not exist.")
    if not dataset_json.is_file():
        raise ValueError(f"{dataset_json} is missing; --task must be an MSD task folder "
                         f"(TaskXX_Name/ with dataset.json, imagesTr, labelsTr, imagesTs), "
                         f"not nnU-Net's converted DatasetXXX_Name.")
    try:
        meta = json.loads(dataset_json.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{dataset_json} is not valid JSON: {error}") from error
    if isinstance(meta, dict) and "channel_names" in meta and "file_ending" in meta and "modality" not in meta:
        raise ValueError(f'{folder} is an nnU-Net dataset ({dataset_json} has "channel_names" and "file_ending", '
                         f'no "modality"): --task takes the original MSD task folder (TaskNN_Name, e.g. '
                         f'Task09_Spleen), whose imagesTs names the archive must use; give the predictions of '
                         f'nnUNetv2_predict as the second value.')
    if "labels" not in meta:
        raise ValueError(f'{dataset_json} has no "labels" entry.')
    labels = parse_labels(meta["labels"], dataset_json)

    test_entries = meta.get("test") or []
    if test_entries:
        source = "dataset.json"
        names = []
        for entry in test_entries:
            if not isinstance(entry, str):
                raise ValueError(f'{dataset_json}: "test" entries must be file paths like '
                                 f'"./imagesTs/case.nii.gz", got {entry!r}.')
            names.append(Path(entry).name)
    else:
        source = "imagesTs/"
        if not images_ts.is_dir():
            raise ValueError(f'{dataset_json} lists no "test" cases and {images_ts} does not exist.')
        names = sorted(p.name for p in images_ts.iterdir() if is_visible_nifti(p.name))
    if not names:
        raise ValueError(f"No test cases in {folder}: dataset.json \"test\" is empty and "
                         f"{images_ts} holds no NIfTI files.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f'{dataset_json}: "test" lists {duplicates} more than once.')
    test_images = {name: images_ts / name for name in names}
    absent = [str(path) for path in test_images.values() if not path.is_file()]
    if absent:
        raise ValueError(f"Test images listed in {dataset_json} are missing: {absent[:5]}"
                         f"{' ...' if len(absent) > 5 else ''}; the geometry of every test image "
                         f"is needed to check its prediction.")
    return MSDTask(name=given.name, folder=folder, test_images=test_images, labels=labels,
                   test_list_source=source)
