"""Checks that a prediction folder is a complete, valid MSD submission for one task.

A broken archive costs a submission slot, so every case is checked before anything is written:
present; a 3D scalar image; the test image's size, spacing, origin and direction; finite,
integral voxel values that are labels of the task's ``dataset.json``. The per-case check
(:func:`check_prediction`) is a pure function of an image, the reference geometry and the label
set, returning findings rather than raising, so one run reports every problem at once.

dtype: uint8/int8/uint16/int16 label maps are expected. Wider integer or float maps whose values
are all finite, integral and valid labels are accepted too (the values are unambiguous). Every
map is written to the archive as uint8 (uint16 if a label exceeds 255), the values unchanged;
a cast is reported as a note. Float maps with NaN/inf or fractional values are invalid.

Completeness: ITK fills the voxels missing from a truncated ``.nii``/``.nii.gz`` with zeros
without an error, so every NIfTI prediction's gzip stream is read to its end (CRC and length
checked) and its data size compared with its header (:func:`file_damage`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_logonet.msd.naming import match_predictions
from nnunet_logonet.msd.task import Geometry, MSDTask, read_geometry, read_task
from nnunet_logonet.nifti import file_damage, is_gzip, nifti_shape

__all__ = ["CaseResult", "TaskReport", "check_prediction", "file_damage", "output_pixel_type",
           "validate_task"]

COMPACT_INTEGER_TYPES = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16}
WIDE_INTEGER_TYPES = {sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64}
FLOAT_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64}
GEOMETRY_RTOL = 1e-4
GEOMETRY_ATOL = 1e-4
MSD_TASK_NAME = re.compile(r"Task\d{2}_[A-Za-z]+")
DAMAGE_FIX = "re-run nnUNetv2_predict for this case (or copy the file again)"


@dataclass(frozen=True)
class CaseResult:
    """The verdict on one expected test case."""

    case: str
    """MSD file name, e.g. ``spleen_1.nii.gz``; the name it gets in the archive."""
    file: Path | None
    """The prediction file checked (None when missing or ambiguous)."""
    reasons: tuple[str, ...] = ()
    """Why the case is invalid; empty when valid."""
    notes: tuple[str, ...] = ()
    """Harmless findings, e.g. a cast applied on write."""

    @property
    def valid(self) -> bool:
        return self.file is not None and not self.reasons


@dataclass
class TaskReport:
    """Per-task outcome of :func:`validate_task`.

    ``found`` holds the valid predictions (ready to pack), ``invalid`` the present but broken
    ones with their reasons, ``missing`` the MSD names with no prediction file.
    """

    task_name: str
    task_folder: Path
    prediction_folder: Path
    labels: dict[int, str]
    expected: list[str]
    found: list[CaseResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    invalid: list[CaseResult] = field(default_factory=list)
    unexpected: list[Path] = field(default_factory=list)
    convention: str = ""
    test_list_source: str = "dataset.json"
    warnings: list[str] = field(default_factory=list)
    """Task-level findings that do not block writing (e.g. an unusual task folder name)."""

    @property
    def complete(self) -> bool:
        """True when every expected case has a valid prediction."""
        return not self.missing and not self.invalid and len(self.found) == len(self.expected)

    def format(self) -> str:
        """Human-readable report: counts, then one line per problem, naming each file."""
        lines = [
            f"{self.task_name}: {len(self.expected)} test cases expected (from "
            f"{self.test_list_source}), {len(self.found)} valid, {len(self.invalid)} invalid, "
            f"{len(self.missing)} missing  [{'complete' if self.complete else 'INCOMPLETE'}]",
            f"  predictions: {self.prediction_folder}",
            f"  naming found: {self.convention}",
        ]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        for name in self.missing:
            lines.append(f"  MISSING {name}: no prediction file for this test case")
        for result in self.invalid:
            where = (f" (file {result.file.name})"
                     if result.file is not None and result.file.name != result.case else "")
            for reason in result.reasons:
                lines.append(f"  INVALID {result.case}{where}: {reason}")
        notes = [(r.case, n) for r in self.found for n in r.notes]
        for case, note in notes[:10]:
            lines.append(f"  note {case}: {note}")
        if len(notes) > 10:
            lines.append(f"  ... {len(notes) - 10} more notes")
        if self.unexpected:
            shown = ", ".join(p.name for p in self.unexpected[:5])
            more = f" and {len(self.unexpected) - 5} more" if len(self.unexpected) > 5 else ""
            lines.append(f"  ignored {len(self.unexpected)} file(s) matching no test case: "
                         f"{shown}{more}")
        return "\n".join(lines)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _geometry_reasons(image: sitk.Image, reference: Geometry) -> list[str]:
    reasons = []
    if tuple(image.GetSize()) != tuple(reference.size):
        reasons.append(f"size (x, y, z) expected {tuple(reference.size)}, got {image.GetSize()}")
    for name, expected, got in (("spacing (x, y, z)", reference.spacing, image.GetSpacing()),
                                ("origin (x, y, z)", reference.origin, image.GetOrigin()),
                                ("direction", reference.direction, image.GetDirection())):
        if not np.allclose(got, expected, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
            reasons.append(f"{name} expected {_fmt(expected)}, got {_fmt(got)}")
    return reasons


def _label_values(array: np.ndarray) -> np.ndarray:
    """Distinct values; bincount is much faster than np.unique on large uint8/uint16 volumes."""
    if array.size == 0:
        return np.array([], dtype=np.int64)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 65536:
            return np.flatnonzero(np.bincount(array.ravel()))
    return np.unique(array)


def output_pixel_type(labels: dict[int, str] | set[int]) -> int:
    """The SimpleITK pixel type written to the archive: uint8 unless a label exceeds 255."""
    return sitk.sitkUInt8 if max(labels) <= 255 else sitk.sitkUInt16


def check_prediction(image: sitk.Image, reference: Geometry, labels: dict[int, str] | set[int],
                     *, nonfinite_on_disk: tuple[int, int] = (0, 0)) -> tuple[list[str], list[str]]:
    """Check one prediction image against its test image's geometry and the task's labels.

    ``nonfinite_on_disk`` adds (NaN, inf) counts seen in the file but lost on reading (see
    :func:`count_nonfinite_on_disk`). Returns ``(reasons, notes)``: the image is valid when
    ``reasons`` is empty. Every problem found is listed, so a user fixes them in one go.
    """
    reasons: list[str] = []
    notes: list[str] = []
    if image.GetDimension() != 3:
        return [f"has {image.GetDimension()} dimensions (size {image.GetSize()}); expected a 3D "
                f"label map of size {tuple(reference.size)}"], notes
    if image.GetNumberOfComponentsPerPixel() != 1:
        return [f"has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                f"({image.GetPixelIDTypeAsString()}); expected one label per voxel"], notes
    reasons += _geometry_reasons(image, reference)

    pixel_id = image.GetPixelID()
    type_name = image.GetPixelIDTypeAsString()
    if pixel_id not in COMPACT_INTEGER_TYPES | WIDE_INTEGER_TYPES | FLOAT_TYPES:
        return reasons + [f"pixel type {type_name} is not a label type; expected uint8"], notes
    array = sitk.GetArrayViewFromImage(image)
    if pixel_id in FLOAT_TYPES:
        n_nan, n_inf = nonfinite_on_disk
        n_nan += int(np.isnan(array).sum())
        n_inf += int(np.isinf(array).sum())
        if n_nan or n_inf:
            return reasons + [f"{type_name} values with {n_nan} NaN and {n_inf} inf voxels; "
                              f"expected integer labels"], notes
        fractional = array[array != np.round(array)]
        if fractional.size:
            return reasons + [f"{type_name} values are not integers (e.g. {fractional[0]:.4g}, "
                              f"{fractional.size} voxels); write label maps (argmax), not "
                              f"probabilities"], notes

    values = [int(v) for v in _label_values(array)]
    unknown = [v for v in values if v not in labels]
    if unknown:
        known = ", ".join(f"{k}={labels[k]}" if isinstance(labels, dict) else str(k)
                          for k in sorted(labels))
        shown = (f"{unknown}" if len(unknown) <= 10 else
                 f"[{', '.join(map(str, unknown[:10]))}, ...] ({len(unknown)} values)")
        image_like = (f"; {len(values)} distinct values look like image intensities, not labels: is this a "
                      f"test image rather than its prediction?" if len(unknown) > 10 else "")
        reasons.append(f"label values {shown} are not in dataset.json labels ({known}){image_like}")
    target = output_pixel_type(labels)
    if pixel_id != target and not reasons:
        notes.append(f"stored as {type_name}; written as "
                     f"{'uint8' if target == sitk.sitkUInt8 else 'uint16'}")
    return reasons, notes


def count_nonfinite_on_disk(path: str | os.PathLike) -> tuple[int, int]:
    """(NaN, inf) voxel counts of a float NIfTI file, read with nibabel.

    ITK up to 5.4 replaces NaN and +-inf by 0 when reading NIfTI (``nifti_read_buffer``; ITK
    pull request 6683), so SimpleITK alone would pass a NaN-filled prediction that other tools
    (nibabel, the challenge's evaluation) read as NaN.
    """
    import nibabel  # a dependency of nnunetv2; only needed for float predictions

    data = np.asanyarray(nibabel.load(str(path)).dataobj)
    return int(np.isnan(data).sum()), int(np.isinf(data).sum())


def _itk_message(error: RuntimeError) -> str:
    """The useful last line of a SimpleITK exception (the first is a source location)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR: ") if lines else "unknown error"


def check_prediction_file(path: str | os.PathLike, reference: Geometry,
                          labels: dict[int, str] | set[int]) -> tuple[list[str], list[str]]:
    """:func:`check_prediction` on a file; an unreadable, truncated or damaged file is a
    finding, not an exception."""
    damage = file_damage(path)
    if damage:
        return [f"{damage}; {DAMAGE_FIX}"], []
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        return [f"cannot be read as an image: {_itk_message(error)}"], []
    if str(path).endswith(".gz") and not is_gzip(path):
        return [f"is not gzip-compressed although its name ends .gz; {DAMAGE_FIX}, or compress "
                f"it with gzip"], []
    shape = nifti_shape(path)
    if shape is not None and len(shape) > 3 and set(shape[3:]) == {1} and image.GetDimension() == 3:
        return [f"its NIfTI header has {len(shape)} dimensions {shape}: ITK drops the trailing ones of size 1, "
                f"other readers (nibabel, the challenge's evaluation) do not; save it as a 3D image"], []
    nonfinite = (0, 0)
    if image.GetPixelID() in FLOAT_TYPES and str(path).endswith((".nii", ".nii.gz")):
        try:
            nonfinite = count_nonfinite_on_disk(path)
        except (OSError, EOFError, ValueError) as error:
            return [f"cannot be read with nibabel ({error}); {DAMAGE_FIX}"], []
    return check_prediction(image, reference, labels, nonfinite_on_disk=nonfinite)


def _prediction_files(prediction_folder: Path) -> list[Path]:
    return [p for p in prediction_folder.iterdir() if p.is_file()]


def validate_task(task_folder: str | os.PathLike, prediction_folder: str | os.PathLike,
                  *, progress: bool = True) -> TaskReport:
    """Validate every test case of an MSD task against a folder of predictions.

    Args:
        task_folder: the original MSD task folder (``Task09_Spleen/``), source of the test case
            list, the test images' geometry and the labels.
        prediction_folder: predictions, e.g. ``nnUNetv2_predict``'s output for
            ``$nnUNet_raw/Dataset009_Spleen/imagesTs``.
        progress: show a tqdm bar over cases (only on a terminal).

    Raises:
        ValueError: when the task folder is not an MSD task or the prediction folder is absent;
            problems with individual predictions are reported, not raised.
    """
    task: MSDTask = read_task(task_folder)
    predictions = Path(prediction_folder).expanduser().resolve()
    if predictions.is_file():
        raise ValueError(f"Prediction folder {predictions} (for {task.name}) is a file; give the folder "
                         f"nnUNetv2_predict wrote.")
    if not predictions.is_dir():
        raise ValueError(f"Prediction folder {predictions} (for {task.name}) does not exist.")
    matched = match_predictions(task.test_images, _prediction_files(predictions))
    report = TaskReport(task_name=task.name, task_folder=task.folder,
                        prediction_folder=predictions, labels=task.labels,
                        expected=list(task.test_images), unexpected=matched.unexpected,
                        convention=matched.convention_summary(),
                        test_list_source=task.test_list_source)
    if not MSD_TASK_NAME.fullmatch(task.name):
        report.warnings.append(f"folder name {task.name!r} does not look like an MSD task "
                               f"(TaskNN_Name, e.g. Task09_Spleen); the archive folder gets this "
                               f"name")
    for case in tqdm(task.test_images, desc=f"checking {task.name}", unit="case",
                     disable=None if progress else True):
        if case in matched.ambiguous:
            names = ", ".join(p.name for p in matched.ambiguous[case])
            report.invalid.append(CaseResult(case, None, (
                f"several files match this case ({names}); keep exactly one",)))
            continue
        if case not in matched.files:
            folder = predictions / case
            if folder.is_dir():  # e.g. unzipped into a folder of the file's name
                report.invalid.append(CaseResult(case, None, (
                    f"{folder} is a folder, not a prediction file; put the NIfTI file itself there",)))
            else:
                report.missing.append(case)
            continue
        path = matched.files[case]
        reasons, notes = check_prediction_file(path, read_geometry(task.test_images[case]),
                                               task.labels)
        if matched.conventions[case] != "msd":
            notes.append(f"found as {path.name}")
        result = CaseResult(case, path, tuple(reasons), tuple(notes))
        (report.found if result.valid else report.invalid).append(result)
    return report
