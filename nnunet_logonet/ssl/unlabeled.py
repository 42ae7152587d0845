"""``logonet_prepare_unlabeled``: turn folders of unlabeled NIfTI scans into an nnU-Net raw dataset.

Self-supervised pre-training runs on nnU-Net's preprocessed data, so unlabeled scans enter the same
way labeled ones do: as ``$nnUNet_raw/DatasetXXX_<Name>/`` with ``imagesTr/`` and ``labelsTr/``.
nnU-Net's fingerprint needs foreground voxels (CT normalisation is fitted on them), so every case
gets a placeholder label: a body mask (voxels above ``--body-threshold``, largest connected
component, holes filled) named "body". The SSL trainer never reads these labels; dataset.json
carries ``"logonet_image_only": true`` to say so.

Input files are ``*.nii.gz`` or ``*.nii``, named ``CASE.nii.gz`` (one channel) or nnU-Net style
``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``... (one file per channel). Everything is checked before
the dataset appears: the dataset is built in a hidden temporary folder next to its final place and
renamed at the end, so a failure leaves nothing behind (what a killed run leaves, the next run removes).

    logonet_prepare_unlabeled -i /data/scans -i /data/more_scans -d 501 --name Unlabeled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_logonet.nifti import file_damage
from nnunet_logonet.workfolders import (exit_cleanly_on_sigterm, new_work_folder, remove_stale_work_folders,
                                         swap_into_place)

__all__ = ["UnlabeledDataError", "body_mask", "find_cases", "prepare_unlabeled", "main"]

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UnlabeledDataError(ValueError):
    """The input folders or the target dataset cannot be used; the message names the file and the fix."""


def _stem(path: Path) -> str | None:
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending) and len(path.name) > len(ending):
            return path.name[: -len(ending)]
    return None


def find_cases(folders: Sequence[str | os.PathLike]) -> dict[str, list[Path]]:
    """Map case name -> its channel files in channel order, from NIfTI files directly inside ``folders``.

    ``CASE_0000 ... CASE_000{C-1}`` form one case of C channels (indices must run from 0 without
    gaps); any other name (``CASE``, ``scan_2019`` without a ``scan_0000``) is a single-channel case
    named after the file.
    """
    if not folders:
        raise UnlabeledDataError("No input folder given: pass -i FOLDER (repeatable).")
    stems: list[tuple[str, Path]] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UnlabeledDataError(f"Input folder {folder} does not exist or is not a folder.")
        found = 0
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            stem = _stem(path)
            if path.is_dir() or stem is None:
                kind = "a folder" if path.is_dir() else "not a NIfTI file"
                raise UnlabeledDataError(
                    f"{path} is {kind}; input folders may only hold scans named *.nii.gz or *.nii "
                    "(subfolders are not searched). Move it out or point -i at the folder of scans."
                )
            stems.append((stem, path))
            found += 1
        if found == 0:
            raise UnlabeledDataError(f"Input folder {folder} holds no *.nii.gz or *.nii file.")

    by_prefix: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for stem, path in stems:
        match = CHANNEL_SUFFIX.match(stem)
        if match:
            by_prefix[match["case"]][int(match["channel"])].append(path)
    for case, channels in by_prefix.items():
        if 0 in channels and sorted(channels) != list(range(len(channels))):
            missing = sorted(set(range(max(channels) + 1)) - set(channels))
            raise UnlabeledDataError(
                f"Case {case!r} has channel files {', '.join(f'{case}_{c:04d}' for c in sorted(channels))} but no "
                f"{', '.join(f'{case}_{c:04d}' for c in missing)}; channels must run from _0000 without gaps."
            )
    cases: dict[str, list[list[Path]]] = defaultdict(list)
    for stem, path in stems:
        match = CHANNEL_SUFFIX.match(stem)
        if match and 0 in by_prefix[match["case"]]:  # nnU-Net style CASE_0000...; else the stem is the case
            case, channel = match["case"], int(match["channel"])
            while len(cases[case]) <= channel:
                cases[case].append([])
            cases[case][channel].append(path)
        else:
            if not cases[stem]:
                cases[stem].append([])
            cases[stem][0].append(path)
    for case, channels in cases.items():
        for files in channels:
            if len(files) != 1:
                raise UnlabeledDataError(
                    f"Duplicate case name {case!r}: {', '.join(map(str, files))}. Case names must be unique across "
                    "all input folders (CASE.nii.gz and CASE_0000.nii.gz name the same case); rename one."
                )
    counts = defaultdict(list)
    for case, channels in cases.items():
        counts[len(channels)].append(case)
    if len(counts) > 1:
        examples = "; ".join(f"{n} channel(s): {names[0]!r} ({len(names)} cases)"
                             for n, names in sorted(counts.items()))
        raise UnlabeledDataError(
            f"Mixed channel counts across cases ({examples}). Every case needs the same channels, one file each "
            "(CASE_0000.nii.gz, CASE_0001.nii.gz, ...)."
        )
    return {case: [files[0] for files in channels] for case, channels in sorted(cases.items())}


def _check_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise UnlabeledDataError(f"{path} cannot be read as NIfTI: {str(error).strip().splitlines()[-1]}") from error
    size = tuple(reader.GetSize())
    if reader.GetDimension() != 3 or min(size) < 2:
        raise UnlabeledDataError(
            f"{path} is {reader.GetDimension()}D with size {size}; expected a 3D volume (no time or channel axis, "
            "no single-slice image). Split 4D files into one 3D file per channel (CASE_0000, CASE_0001, ...)."
        )
    if reader.GetNumberOfComponents() != 1:
        raise UnlabeledDataError(
            f"{path} has {reader.GetNumberOfComponents()} values per voxel; expected one. Store each channel in its "
            "own file (CASE_0000, CASE_0001, ...)."
        )
    return size, tuple(reader.GetSpacing())


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UnlabeledDataError(f"{path} cannot be read as NIfTI: {str(error).strip().splitlines()[-1]}") from error


def _check_complete(path: Path) -> None:
    """SimpleITK zero-fills a truncated .nii or .nii.gz without complaint: check the bytes first."""
    damage = file_damage(path)
    if damage:
        raise UnlabeledDataError(f"{path} cannot be read as NIfTI: {damage}. Copy or export it again.")


def body_mask(image: sitk.Image, *, threshold: float = -500.0) -> sitk.Image:
    """Placeholder foreground: voxels > threshold, largest connected component, holes filled (uint8 0/1).

    When no voxel exceeds the threshold the whole image is foreground (with a warning), so nnU-Net's
    fingerprint still finds intensities to normalise with.
    """
    above = sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) > threshold, sitk.sitkUInt8)  # no wrap-around in uint
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(above), sortByObjectSize=True) == 1
    mask = sitk.Cast(sitk.BinaryFillhole(largest, fullyConnected=False, foregroundValue=1), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        warnings.warn(f"No voxel above {threshold}: the whole image is used as the body label.", UserWarning,
                      stacklevel=2)
        mask = sitk.Cast(image == image, sitk.sitkUInt8)
    mask.CopyInformation(image)
    return mask


def _check_target(raw_root: Path, dataset_id: int, folder_name: str, overwrite: bool) -> None:
    prefix = f"Dataset{dataset_id:03d}_"
    roots = {"nnUNet_raw": raw_root}
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        if os.environ.get(var):
            roots[var] = Path(os.environ[var])
    for var, root in roots.items():
        if not root.is_dir():
            continue
        for other in root.iterdir():
            if other.name.startswith(prefix) and other.name != folder_name:
                raise UnlabeledDataError(
                    f"Dataset ID {dataset_id} is already used by {other} ({var}); choose another -d ID or rename "
                    f"with --name {other.name[len(prefix):]}."
                )
    target = raw_root / folder_name
    if target.exists() and not overwrite:
        raise UnlabeledDataError(f"{target} already exists; pass --overwrite to replace it.")
    if target.exists():
        _check_replaceable(target)


def _check_replaceable(target: Path) -> None:
    """``--overwrite`` replaces only a dataset this command made: one wrong ID must not delete a labeled
    dataset's ground truth (its ``labelsTr``, ``imagesTs``, ``dataset.json``)."""
    meta_file = target / "dataset.json"
    try:
        meta = json.loads(meta_file.read_text())
        made_here = isinstance(meta, dict) and meta.get("logonet_image_only") is True
        why = "has no \"logonet_image_only\": true"
    except FileNotFoundError:
        made_here, why = False, "is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        made_here, why = False, f"cannot be read ({error})"
    if not made_here:
        raise UnlabeledDataError(
            f"{target} was not made by logonet_prepare_unlabeled ({meta_file} {why}), so --overwrite will not "
            f"replace it: it may be a labeled dataset. Choose another -d ID or --name, or move that folder away "
            f"yourself if you really mean to replace it.")


def prepare_unlabeled(
    folders: Sequence[str | os.PathLike],
    dataset_id: int,
    *,
    name: str = "Unlabeled",
    channel_names: Sequence[str] | None = None,
    body_threshold: float = -500.0,
    hardlink: bool = False,
    overwrite: bool = False,
    raw_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Build ``DatasetXXX_<name>`` in ``raw_root`` (default ``$nnUNet_raw``) from unlabeled scans; returns its path.

    Args:
        folders: folders of NIfTI scans (see :func:`find_cases` for naming).
        dataset_id: nnU-Net dataset ID, 1..999.
        name: dataset name after ``DatasetXXX_``.
        channel_names: one name per channel for dataset.json (default ``["CT"]`` for one channel; "CT"
            selects nnU-Net's CT normalisation).
        body_threshold: intensity above which a voxel belongs to the placeholder body label.
        hardlink: hard-link ``.nii.gz`` inputs instead of copying them (falls back to a copy across devices).
        overwrite: replace an existing dataset of the same ID and name, if this function made it (its
            ``dataset.json`` says ``"logonet_image_only": true``); any other is refused, never deleted.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise UnlabeledDataError(f"Dataset ID must be an int in 1..999, got {dataset_id!r}.")
    if not DATASET_NAME.match(name) or "__" in name:
        raise UnlabeledDataError(f"--name must be letters, digits, '_', '-', '.' (no '__'), got {name!r}.")
    if not math.isfinite(body_threshold):
        raise UnlabeledDataError(f"--body-threshold must be a finite intensity, got {body_threshold}; voxels above "
                                 f"it form the placeholder body label (default -500, in HU for CT).")
    if raw_root is None:
        if not os.environ.get("nnUNet_raw"):
            raise UnlabeledDataError("nnUNet_raw is not set; export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                                     "setting_up_paths.md).")
        raw_root = os.environ["nnUNet_raw"]
        where = f"nnUNet_raw={raw_root}"
    else:
        where = f"raw_root {raw_root}"
    raw_root = Path(raw_root)
    if raw_root.exists() and not raw_root.is_dir():
        raise UnlabeledDataError(f"{where} is a file, not a folder; point it at the folder of nnU-Net's raw "
                                 f"datasets (export nnUNet_raw=/path/to/nnUNet_raw).")
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    _check_target(raw_root, dataset_id, folder_name, overwrite)

    cases = find_cases(folders)
    for case, files in cases.items():
        size, spacing = _check_header(files[0])
        for other in files[1:]:
            other_size, other_spacing = _check_header(other)
            if other_size != size or not np.allclose(other_spacing, spacing, rtol=1e-4):
                raise UnlabeledDataError(
                    f"{other} (size {other_size}, spacing {other_spacing}) does not match channel 0 {files[0]} "
                    f"(size {size}, spacing {spacing}); the channels of case {case!r} must share one grid."
                )

    n_channels = len(next(iter(cases.values())))
    if channel_names is None:
        if n_channels != 1:
            raise UnlabeledDataError(f"The cases have {n_channels} channels: give one --channel-name per channel.")
        channel_names = ["CT"]
    if len(channel_names) != n_channels:
        raise UnlabeledDataError(f"{len(channel_names)} --channel-name given for {n_channels}-channel cases.")

    try:
        raw_root.mkdir(parents=True, exist_ok=True)
        remove_stale_work_folders(raw_root, folder_name, "tmp")
        work = new_work_folder(raw_root, folder_name, "tmp")
    except OSError as error:
        raise UnlabeledDataError(f"Cannot write into {where} ({error.strerror or error}); point it at a folder you "
                                 f"can create and write to.") from error
    try:
        (work / "imagesTr").mkdir()
        (work / "labelsTr").mkdir()
        for case, files in tqdm(cases.items(), desc=f"writing {folder_name}", disable=not progress):
            for channel, source in enumerate(files):
                _check_complete(source)
                image = _read(source) if channel == 0 or source.name.endswith(".nii") else None
                target = work / "imagesTr" / f"{case}_{channel:04d}.nii.gz"
                if source.name.endswith(".nii"):
                    sitk.WriteImage(image, str(target), useCompression=True)
                elif hardlink:
                    try:
                        os.link(source, target)
                    except OSError:
                        shutil.copyfile(source, target)
                else:
                    shutil.copyfile(source, target)
                if channel == 0:
                    label = body_mask(image, threshold=body_threshold)
                    sitk.WriteImage(label, str(work / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

        generate_dataset_json(
            str(work),
            channel_names=dict(enumerate(channel_names)),
            labels={"background": 0, "body": 1},
            num_training_cases=len(cases),
            file_ending=".nii.gz",
            dataset_name=folder_name,
            description=f"Image-only dataset for self-supervised pre-training; labelsTr holds placeholder body masks "
                        f"(> {body_threshold}) for nnU-Net's fingerprint only.",
            converted_by="logonet_prepare_unlabeled",
            logonet_image_only=True,
        )
        final = raw_root / folder_name
        swap_into_place(work, final)  # an existing dataset is replaced only by a complete one
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="logonet_prepare_unlabeled",
        description="Create an nnU-Net raw dataset ($nnUNet_raw/DatasetXXX_<Name>) from folders of unlabeled NIfTI "
                    "scans, for Masked LoGoNet pre-training (placeholder body-mask labels for nnU-Net's fingerprint).",
    )
    parser.add_argument("-i", dest="folders", action="append", required=True, metavar="FOLDER",
                        help="folder of *.nii.gz / *.nii scans (CASE.nii.gz or CASE_0000.nii.gz); repeatable")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, metavar="ID", help="dataset ID, 1..999")
    parser.add_argument("--name", default="Unlabeled", help="dataset name after DatasetXXX_ (default: Unlabeled)")
    parser.add_argument("--channel-name", dest="channel_names", action="append", metavar="NAME",
                        help="channel name for dataset.json, once per channel (default: CT for one channel)")
    parser.add_argument("--body-threshold", type=float, default=-500.0,
                        help="intensity above which a voxel is body in the placeholder label (default: -500 HU)")
    parser.add_argument("--hardlink", action="store_true", help="hard-link .nii.gz inputs instead of copying")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of this ID and name that this command made (never a "
                             "labeled one)")
    args = parser.parse_args(argv)
    if argv is None:  # the console script
        exit_cleanly_on_sigterm()
    try:
        final = prepare_unlabeled(args.folders, args.dataset_id, name=args.name, channel_names=args.channel_names,
                                  body_threshold=args.body_threshold, hardlink=args.hardlink, overwrite=args.overwrite)
    except UnlabeledDataError as error:
        parser.exit(1, f"logonet_prepare_unlabeled: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "logonet_prepare_unlabeled: interrupted; no dataset was written (an existing one is "
                         "unchanged). Run the same command again.\n")
    n_cases = len(list((final / "labelsTr").glob("*.nii.gz")))
    print(f"Wrote {final} ({n_cases} cases). Plan and preprocess it like any dataset, or reuse a labeled dataset's "
          f"plans: nnUNetv2_extract_fingerprint -d {args.dataset_id}, then nnUNetv2_move_plans_between_datasets "
          "(see docs/ssl.md).")


if __name__ == "__main__":
    main()
