"""Mapping prediction file names back to the MSD test case names.

How names travel (read off nnunetv2 2.8.1, ``dataset_conversion/convert_MSD_dataset.py`` and
``inference/predict_from_raw_data.py``):

- ``nnUNetv2_convert_MSD_dataset`` keeps each case identifier and only appends the channel:
  MSD ``imagesTs/spleen_1.nii.gz`` becomes ``imagesTs/spleen_1_0000.nii.gz`` (a 4D multi-modal
  image becomes ``BRATS_485_0000`` ... ``BRATS_485_0003``). Files starting with ``.`` or ``_``
  (macOS ``._*`` files in the MSD tarballs) are skipped.
- ``nnUNetv2_predict`` strips the channel again, so its output ``spleen_1.nii.gz`` already has
  the MSD name.

Accepted, best first: the MSD name itself (``.nii.gz`` or ``.nii``); the nnU-Net image name
with a ``_0000`` channel suffix (files copied by hand); the same case number with different
zero padding (``spleen_001`` for ``spleen_1``, from scripts that renumber cases), used only when
it is unambiguous within the task.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_logonet.msd.task import NIFTI_SUFFIXES, is_visible_nifti

__all__ = ["CONVENTIONS", "NameMatch", "case_identifier", "match_predictions"]

CONVENTIONS = {
    "msd": "MSD file name (also what nnUNetv2_predict writes after nnUNetv2_convert_MSD_dataset)",
    "msd_uncompressed": "MSD case name as uncompressed .nii",
    "nnunet_channel": "nnU-Net image name with channel suffix _0000",
    "renumbered": "same case number with different zero padding",
}
_CHANNEL_SUFFIX = re.compile(r"_0000$")
_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


def case_identifier(file_name: str) -> str:
    """``spleen_1.nii.gz`` -> ``spleen_1`` (also for ``.nii``)."""
    for suffix in NIFTI_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def _number_key(identifier: str) -> tuple[str, int] | None:
    match = _TRAILING_NUMBER.match(identifier)
    return (match.group(1), int(match.group(2))) if match else None


@dataclass
class NameMatch:
    """Result of matching a prediction folder's files to a task's test cases."""

    files: dict[str, Path] = field(default_factory=dict)
    """MSD file name -> the one prediction file found for it."""
    conventions: dict[str, str] = field(default_factory=dict)
    """MSD file name -> convention key (see ``CONVENTIONS``) of its file."""
    ambiguous: dict[str, list[Path]] = field(default_factory=dict)
    """MSD file name -> several files that could all be its prediction."""
    unexpected: list[Path] = field(default_factory=list)
    """NIfTI files that match no test case (e.g. training-case predictions)."""

    def convention_summary(self) -> str:
        """One line naming the convention(s) found, e.g. ``"MSD file name (10)"``."""
        counts = Counter(self.conventions.values())
        if not counts:
            return "none (no prediction matched a test case)"
        return "; ".join(f"{CONVENTIONS[key]} ({n})" for key, n in counts.most_common())


def match_predictions(expected: Iterable[str], prediction_files: Iterable[Path]) -> NameMatch:
    """Assign each prediction file to at most one expected MSD file name.

    Each file is matched by the best convention that fits it. A case with more than one
    candidate file is reported as ambiguous rather than guessed.
    """
    expected = list(expected)
    by_identifier = {case_identifier(name): name for name in expected}
    number_keys = Counter(_number_key(i) for i in by_identifier)
    by_number = {_number_key(i): name for i, name in by_identifier.items()
                 if _number_key(i) is not None and number_keys[_number_key(i)] == 1}

    candidates: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    result = NameMatch()
    for path in sorted(prediction_files):
        if not is_visible_nifti(path.name):
            continue
        identifier = case_identifier(path.name)
        stripped = _CHANNEL_SUFFIX.sub("", identifier)
        if identifier in by_identifier:
            case = by_identifier[identifier]
            convention = "msd" if path.name == case else "msd_uncompressed"
        elif stripped != identifier and stripped in by_identifier:
            case, convention = by_identifier[stripped], "nnunet_channel"
        elif _number_key(stripped) in by_number:
            case, convention = by_number[_number_key(stripped)], "renumbered"
        else:
            result.unexpected.append(path)
            continue
        candidates[case].append((path, convention))

    for case in expected:
        found = candidates.get(case, [])
        if len(found) == 1:
            result.files[case], result.conventions[case] = found[0]
        elif len(found) > 1:
            result.ambiguous[case] = [path for path, _ in found]
    return result
