"""Write phantom cases as an nnU-Net v2 raw dataset or a Medical Segmentation Decathlon task.

nnU-Net layout (``fmt="nnunet"``), ``<root>/DatasetXXX_<Name>/``::

    imagesTr/<Name>_000_0000.nii.gz   labelsTr/<Name>_000.nii.gz     training cases
    imagesTs/<Name>_ts000_0000.nii.gz labelsTs/<Name>_ts000.nii.gz   held-out test cases + references
    imagesUnlabeled/<Name>_un000_0000.nii.gz                         image-only cases (pretraining)
    dataset.json                                                     nnU-Net v2 format (+ numTest, numUnlabeled)

MSD layout (``fmt="msd"``), ``<root>/TaskXX_<Name>/``: the same folders with single 3D files
without the channel suffix (``imagesTr/<Name>_000.nii.gz``) and an MSD ``dataset.json``
(``modality``, ``training``, ``test``). ``nnUNetv2_convert_MSD_dataset`` reads only
``imagesTr``, ``labelsTr``, ``imagesTs`` and ``dataset.json``, so the test references in
``labelsTs/`` and the unlabeled images in ``imagesUnlabeled/`` ride along inside the task folder
without disturbing the conversion (they are not copied by it).

Every case has its own seed, derived from (seed, split, index): adding cases never changes
existing ones. A dataset is written to a hidden temporary folder next to its final place and
renamed into place at the end, so an interrupted run never leaves a half-written dataset; the
hidden folder a killed run could not remove is removed by the next run of the same dataset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_logonet.phantom.anatomy import LABELS, MAX_SIZE, MIN_SIZE, generate_case
from nnunet_logonet.workfolders import new_work_folder, remove_stale_work_folders, swap_into_place

__all__ = [
    "FORMATS", "SPLITS", "PhantomArgumentError", "case_identifier", "case_seed",
    "dataset_folder_name", "write_dataset",
]

FORMATS = ("nnunet", "msd")
SPLITS = {"train": 0, "test": 1, "unlabeled": 2}
_SPLIT_PREFIX = {"train": "", "test": "ts", "unlabeled": "un"}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")
GENERATOR_VERSION = 1  # bump when the same seed would draw a different patient


class PhantomArgumentError(ValueError):
    """A bad argument; ``param`` names it so a command line can name its flag."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def case_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one case, independent of how many cases the dataset has."""
    return np.random.SeedSequence([int(seed), SPLITS[split], int(index), GENERATOR_VERSION])


def case_identifier(name: str, split: str, index: int) -> str:
    """``Phantom_000`` (train), ``Phantom_ts000`` (test), ``Phantom_un000`` (unlabeled)."""
    return f"{name}_{_SPLIT_PREFIX[split]}{index:03d}"


def dataset_folder_name(dataset_id: int, name: str, fmt: str = "nnunet") -> str:
    """``Dataset900_Phantom`` for nnU-Net, ``Task09_Phantom`` for MSD."""
    return f"Dataset{dataset_id:03d}_{name}" if fmt == "nnunet" else f"Task{dataset_id:02d}_{name}"


def _check_int(param: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise PhantomArgumentError(param, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise PhantomArgumentError(param, f"must be {wanted}, got {value}")


def check_arguments(*, dataset_id: int, name: str, num_train: int, num_test: int,
                    num_unlabeled: int, seed: int, size: int, fmt: str) -> None:
    """Raise PhantomArgumentError (with the parameter's name) for impossible values."""
    if fmt not in FORMATS:
        raise PhantomArgumentError("fmt", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_int("dataset_id", dataset_id, 1, 999 if fmt == "nnunet" else 99)
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise PhantomArgumentError(
            "name", f"must be letters and digits, optionally joined by '-' (no '_': nnU-Net and "
                    f"the MSD converter split folder names on it), got {name!r}")
    _check_int("num_train", num_train, 1)
    _check_int("num_test", num_test, 0)
    _check_int("num_unlabeled", num_unlabeled, 0)
    _check_int("seed", seed, 0)
    _check_int("size", size, MIN_SIZE, MAX_SIZE)


def _write_image(array: np.ndarray, spacing, origin, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    # zlib's gzip header carries no time stamp and NIfTI has none: same array, same bytes
    sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=6)


def _nnunet_json(name: str, num_train: int, num_test: int, num_unlabeled: int, seed: int,
                 size: int) -> dict:
    return {
        "name": name,
        "description": "Synthetic contrast-enhanced abdominal CT (nnunet-logonet built-in phantom)",
        "reference": "nnunet-logonet, nnunet_logonet.phantom",
        "licence": "CC0-1.0",
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "numTest": num_test,
        "numUnlabeled": num_unlabeled,
        "phantom": {"seed": seed, "size": size, "generator_version": GENERATOR_VERSION},
    }


def _msd_json(name: str, train: list[str], test: list[str], num_unlabeled: int, seed: int,
              size: int) -> dict:
    return {
        "name": name,
        "description": "Synthetic contrast-enhanced abdominal CT (nnunet-logonet built-in phantom)",
        "reference": "nnunet-logonet, nnunet_logonet.phantom",
        "licence": "CC0-1.0",
        "release": f"phantom generator {GENERATOR_VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in LABELS.items()},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
        # not top-level: the converter copies unknown keys but not imagesUnlabeled/ itself
        "phantom": {"seed": seed, "size": size, "generator_version": GENERATOR_VERSION,
                    "numUnlabeled": num_unlabeled, "unlabeled_folder": "./imagesUnlabeled",
                    "test_labels_folder": "./labelsTs"},
    }


def conflicting_folders(root: Path, dataset_id: int, folder_name: str, fmt: str = "nnunet") -> list[str]:
    """Folders in ``root`` of another dataset with ``dataset_id`` (nnU-Net stops on two names for one id)."""
    prefix = f"Dataset{dataset_id:03d}_" if fmt == "nnunet" else f"Task{dataset_id:02d}_"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.name.startswith(prefix) and p.name != folder_name)


def write_dataset(root: str | os.PathLike, dataset_id: int, *, name: str = "Phantom",
                  num_train: int = 20, num_test: int = 5, num_unlabeled: int = 10,
                  seed: int = 0, size: int = 64, fmt: str = "nnunet", overwrite: bool = False,
                  progress: bool = False) -> Path:
    """Generate a phantom dataset under ``root`` and return its folder.

    Raises:
        PhantomArgumentError: an impossible value, ``dataset_id`` already used in ``root``
            by a dataset with another name, or a ``root`` that cannot be created or written to
            (``param`` is ``"root"``).
        FileExistsError: the dataset folder exists and ``overwrite`` is False.
    """
    check_arguments(dataset_id=dataset_id, name=name, num_train=num_train, num_test=num_test,
                    num_unlabeled=num_unlabeled, seed=seed, size=size, fmt=fmt)
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"output root {root} is a file, not a folder")
    folder_name = dataset_folder_name(dataset_id, name, fmt)
    final = root / folder_name
    taken = conflicting_folders(root, dataset_id, folder_name, fmt)
    if taken:
        raise PhantomArgumentError(
            "dataset_id", f"{dataset_id} is already used in {root} by {', '.join(taken)}; "
                          f"choose another id (or the same name)")
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")

    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_work_folders(root, folder_name, "partial")
        work = new_work_folder(root, folder_name, "partial")
    except OSError as error:
        raise PhantomArgumentError(
            "root", f"cannot write into {root} ({error.strerror or error}); choose a folder you can "
                    f"create and write to") from error
    try:
        os.chmod(work, 0o755)
        _fill(work, folder_name, name=name, num_train=num_train, num_test=num_test,
              num_unlabeled=num_unlabeled, seed=seed, size=size, fmt=fmt, progress=progress)
        swap_into_place(work, final)  # an existing dataset is replaced only by a complete one
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def _fill(folder: Path, folder_name: str, *, name: str, num_train: int, num_test: int, num_unlabeled: int,
          seed: int, size: int, fmt: str, progress: bool) -> None:
    channel = "_0000" if fmt == "nnunet" else ""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
        (folder / sub).mkdir()
    plan = [("train", "imagesTr", "labelsTr", num_train), ("test", "imagesTs", "labelsTs", num_test),
            ("unlabeled", "imagesUnlabeled", None, num_unlabeled)]
    identifiers: dict[str, list[str]] = {}
    with tqdm(total=num_train + num_test + num_unlabeled, desc=folder_name,
              unit="case", disable=not progress) as bar:
        for split, image_dir, label_dir, count in plan:
            identifiers[split] = []
            for index in range(count):
                case = generate_case(case_seed(seed, split, index), size=size)
                identifier = case_identifier(name, split, index)
                identifiers[split].append(identifier)
                _write_image(case.image, case.spacing, case.origin,
                             folder / image_dir / f"{identifier}{channel}.nii.gz")
                if label_dir is not None:
                    _write_image(case.label, case.spacing, case.origin,
                                 folder / label_dir / f"{identifier}.nii.gz")
                bar.update()
    if fmt == "nnunet":
        meta = _nnunet_json(name, num_train, num_test, num_unlabeled, seed, size)
    else:
        meta = _msd_json(name, identifiers["train"], identifiers["test"], num_unlabeled, seed, size)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
