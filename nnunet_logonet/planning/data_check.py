"""Does a preprocessed data folder hold data made with these plans?

Plans of different names can name the same data folder: LoGoNet's 3d_fullres shares
``nnUNetPlans_3d_fullres`` with nnU-Net's default plans (as nnU-Net's ResEnc planners do), and
``nnUNetv2_move_plans_between_datasets`` keeps that name when the plans keep theirs. Preprocessing
one set then replaces the other's data, and nnU-Net trains on it without a word, at a spacing its
plans do not have. One case's stored shape, against the shape these plans' resampling gives it,
tells (nnU-Net's own rule: ``compute_new_shape`` of the cropped shape from the case's spacing to
the plans' target spacing).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_spacing_mismatch", "missing_case_files", "raw_case_files", "repair_label_copies",
           "undeclared_label_values"]


def raw_case_files(raw_dataset: Path, dataset_json: dict | None = None) -> dict[str, list[Path]]:
    """Each training case's raw files (images and label), as nnU-Net's preprocessing reads them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    return {case: [Path(f) for f in files["images"]] + [Path(files["label"])] for case, files in cases.items()}


def data_spacing_mismatch(data_folder: str | Path, plans: dict, configuration: str) -> str | None:
    """Why ``data_folder`` was not preprocessed with ``plans``' spacing for ``configuration``; None when it
    was (or when there is nothing to check: no folder, no case)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(data_folder)
    if not folder.is_dir():
        return None
    try:
        dataset_class = infer_dataset_class(str(folder))
    except Exception:  # no cases yet, or a layout nnU-Net does not know: its own loader will say so
        return None
    cases = sorted(dataset_class.get_identifiers(str(folder)))
    if not cases:
        return None
    case = cases[0]
    data, _, _, properties = dataset_class(str(folder), [case]).load_case(case)
    config = plans["configurations"][configuration]
    while "spacing" not in config and config.get("inherits_from"):
        config = plans["configurations"][config["inherits_from"]]
    transpose = plans.get("transpose_forward", [0, 1, 2])
    original_spacing = [properties["spacing"][i] for i in transpose]
    target_spacing = list(config["spacing"])
    cropped = properties["shape_after_cropping_and_before_resampling"]
    if len(target_spacing) < len(cropped):
        target_spacing = [original_spacing[0]] + target_spacing
    expected = tuple(int(s) for s in compute_new_shape(cropped, original_spacing, target_spacing))
    stored = tuple(int(s) for s in data.shape[1:])
    if stored == expected:
        return None
    return (f"{folder / case} holds data of shape {list(stored)}, but plans {plans.get('plans_name', '?')} "
            f"({configuration}, spacing {target_spacing}) resample this case to {list(expected)}: the folder was "
            f"preprocessed with other plans that share its name ({folder.name})")


def missing_case_files(data_folder: str | Path, cases: list[str], segmentations_only: bool = False
                       ) -> dict[str, str]:
    """Case -> the first file of it that ``data_folder`` lacks, for every case of ``cases`` not whole there.

    nnU-Net's data loader meets such a case in a background worker, and the run ends with
    "background workers are no longer alive", the real error buried above. Its layout is taken
    from the folder as nnU-Net's loader takes it (``.b2nd`` + ``_seg.b2nd``, or ``.npz``; ``.pkl``
    beside each). ``segmentations_only``: a folder of one file per case (``.b2nd`` or ``.npz``), as a cascade's
    ``predicted_next_stage`` holds."""
    folder = Path(data_folder)
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return {case: f"{folder}/" for case in cases}
    blosc2 = any(n.endswith(".b2nd") for n in names) or not any(n.endswith(".npz") for n in names)
    if segmentations_only:
        layout = (".b2nd",) if blosc2 else (".npz",)
    else:
        layout = (".b2nd", "_seg.b2nd", ".pkl") if blosc2 else (".npz", ".pkl")
    missing = {}
    for case in cases:
        for suffix in layout:
            if case + suffix not in names:
                missing[case] = case + suffix
                break
    return missing


def repair_label_copies(preprocessed_dataset: str | Path, raw_labels: dict[str, Path], file_ending: str) -> list[str]:
    """Copy again every label of ``gt_segmentations/`` that is missing or differs in size from its raw
    label; returns those cases.

    nnU-Net's ``preprocess_dataset`` copies each raw label there only when the copy is older
    (``copy_file(..., update=True)``), so a copy cut short by an interrupted run is newer, stays, and
    validation Dice is computed against a truncated label (read without an error). Each copy goes
    through a temporary file and a rename.
    """
    from nnunet_logonet.workfolders import copy_file_whole

    gt_folder = Path(preprocessed_dataset) / "gt_segmentations"
    repaired = []
    for case, raw_label in sorted(raw_labels.items()):
        copy = gt_folder / f"{case}{file_ending}"
        try:
            if copy.stat().st_size == raw_label.stat().st_size:
                continue
        except FileNotFoundError:
            if not raw_label.is_file():
                continue
        copy_file_whole(raw_label, copy)
        repaired.append(case)
    return repaired


def undeclared_label_values(data_folder: str | Path, cases: list[str], declared: set[int],
                            progress: bool = True) -> dict[str, list[int]]:
    """Case -> the values of its preprocessed segmentation that ``declared`` lacks, for every case of ``cases``
    that has any.

    nnU-Net checks label values only with ``--verify_dataset_integrity``; without it a stray value (a 255 from
    an annotation tool, a label missing from dataset.json) is preprocessed as it is and stops training at the
    loss's one-hot encoding ("index 9 is out of bounds for dimension 1 with size 7"), naming no file. -1 is
    nnU-Net's own mark for voxels outside the nonzero crop and always allowed."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm

    folder = Path(data_folder)
    dataset_class = infer_dataset_class(str(folder))
    dataset = dataset_class(str(folder), list(cases))
    allowed = set(int(v) for v in declared) | {-1}
    found = {}
    for case in tqdm(cases, desc="Reading the labels for values dataset.json lacks", disable=not progress):
        seg = np.asarray(dataset.load_case(case)[1][:])
        values = np.unique(seg)
        extra = sorted(int(v) for v in values if int(v) not in allowed)
        if extra:
            found[case] = extra
    return found
