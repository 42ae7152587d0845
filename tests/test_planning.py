"""LoGoNet planners: strides follow anisotropy, patches are always valid, memory target is honoured."""

from __future__ import annotations

import json
import re
import shutil
from copy import deepcopy

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_logonet.network import check_patch_size, required_patch_multiple
from nnunet_logonet.planning.topology import choose_local_grid, consistent_topology, plan_strides, round_to_multiple


@pytest.mark.parametrize("spacing, patch, first_steps", [
    ((1.0, 1.0, 1.0), (96, 96, 96), [[2, 2, 2], [2, 2, 2]]),
    ((3.0, 0.8, 0.8), (48, 160, 160), [[1, 2, 2], [2, 2, 2]]),
    ((5.0, 0.7, 0.7), (24, 192, 192), [[1, 2, 2], [1, 2, 2]]),
])
def test_anisotropic_spacing_gives_anisotropic_strides(spacing, patch, first_steps):
    strides = plan_strides(spacing, patch)
    assert strides[0] == [1, 1, 1]
    assert len(strides) == 6
    assert strides[1:3] == first_steps


def test_strides_never_shrink_an_axis_below_min_edge():
    """8 voxels halve to 4 and to 2 (min_edge, allowed), not to 1."""
    strides = plan_strides((1.0, 1.0, 1.0), (8, 96, 96), min_edge=2)
    total = np.prod(np.asarray(strides), axis=0)
    assert total[0] == 4 and total[1] == 32


def test_an_axis_twice_as_coarse_waits_as_in_nnunet():
    """nnU-Net pools an axis only while its spacing is under twice the finest one: at exactly 2x it waits
    for the in-plane axes to catch up."""
    strides = plan_strides((2.0, 1.0, 1.0), (64, 128, 128))
    assert strides[1] == [1, 2, 2] and strides[2] == [2, 2, 2]


def test_patch_sizes_round_to_the_nearest_multiple():
    assert round_to_multiple((50, 40, 100), (32, 32, 32)) == [64, 32, 96]
    assert round_to_multiple((10, 40, 100), (32, 32, 32), upper=(10, 64, 64)) == [32, 32, 64]


@pytest.mark.parametrize("patch, grid", [((32, 32, 32), [2, 2, 2]), ((16, 32, 32), [1, 2, 2]),
                                          ((16, 16, 16), [1, 1, 1]), ((64, 64, 64), [2, 2, 2])])
def test_an_axis_is_split_for_the_local_paths_only_where_their_deepest_map_keeps_two_voxels(patch, grid):
    """The local paths pool a sub-crop by the strides of their first three stages (8 here): a 16-voxel
    sub-crop keeps 2 voxels and is split, an 8-voxel one would keep 1 and is not."""
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert choose_local_grid(patch, strides) == grid


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (4.0, 0.6, 0.9), (0.7, 0.7, 3.0)])
@pytest.mark.parametrize("patch", [(37, 101, 77), (96, 96, 96), (20, 250, 250), (64, 64, 64)])
def test_consistent_topology_is_valid_for_the_network(spacing, patch):
    new_patch, strides, grid = consistent_topology(spacing, patch)
    check_patch_size(new_patch, strides, grid, 2)  # raises if invalid
    multiple = required_patch_multiple(strides, grid, 2)
    assert all(p % m == 0 for p, m in zip(new_patch, multiple))
    assert all(g in (1, 2) for g in grid)


# ---------------------------------------------------------------------------------------------
# Planner on a controlled fingerprint (no preprocessing needed)

def _fake_dataset(root, dataset_id: int, spacing_zyx, shape_zyx, n_cases: int = 4):
    raw = root / "raw" / f"Dataset{dataset_id:03d}_Fake"
    pre = root / "preprocessed" / raw.name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    pre.mkdir(parents=True)
    for i in range(n_cases):
        img = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16))
        img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
        sitk.WriteImage(img, str(raw / "imagesTr" / f"case{i}_0000.nii.gz"))
        sitk.WriteImage(sitk.Cast(img, sitk.sitkUInt8), str(raw / "labelsTr" / f"case{i}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    fingerprint = {
        "spacings": [list(spacing_zyx) for _ in range(n_cases)],
        "shapes_after_crop": [list(shape_zyx) for _ in range(n_cases)],
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 300.0, "mean": 50.0, "median": 50.0, "min": -100.0, "percentile_00_5": -90.0,
            "percentile_99_5": 250.0, "std": 40.0}},
    }
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return raw, pre


@pytest.fixture()
def nnunet_dirs(tmp_path, monkeypatch):
    """nnU-Net >= 2.8 reads its folders from the environment at use time."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return tmp_path


def _plan(planner_cls, dataset_id, target=None):
    planner = planner_cls(dataset_id, gpu_memory_target_in_gb=target)
    return planner.plan_experiment()


def test_plans_of_another_network_are_never_replaced(nnunet_dirs):
    """LoGoNet plans written over a ResEnc's (or nnU-Net's) plans file would make its trainer build LoGoNet under
    the baseline's name: refused, naming the file and a name to use; the file is left as it was."""
    import json

    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner, PlanningError

    _, pre = _fake_dataset(nnunet_dirs, 807, (1.0, 1.0, 1.0), (40, 40, 40))
    theirs = {"plans_name": "nnUNetResEncUNetMPlans", "configurations": {"3d_fullres": {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}}}}
    (pre / "nnUNetResEncUNetMPlans.json").write_text(json.dumps(theirs))
    planner = LoGoNetTinyPlanner(807, plans_name="nnUNetResEncUNetMPlans")
    with pytest.raises(PlanningError, match=r"nnUNetResEncUNetMPlans.json already holds plans for "
                                            r"dynamic_network_architectures.*ResidualEncoderUNet \(3d_fullres\).*"
                                            r"-overwrite_plans_name nnUNetResEncUNetMPlans_logonet"):
        planner.plan_experiment()
    assert json.loads((pre / "nnUNetResEncUNetMPlans.json").read_text()) == theirs
    # LoGoNet's own plans of that name are replaced as before (a re-planning)
    LoGoNetTinyPlanner(807, plans_name="LoGoNetTinyPlans").plan_experiment()
    LoGoNetTinyPlanner(807, plans_name="LoGoNetTinyPlans").plan_experiment()


def test_planner_writes_logonet_3d_configuration(nnunet_dirs):
    from nnunet_logonet.planning.planners import LoGoNetPlanner

    _fake_dataset(nnunet_dirs, 801, (3.0, 0.8, 0.8), (80, 256, 256))
    plans = _plan(LoGoNetPlanner, 801)
    assert "2d" not in plans["configurations"]
    full = plans["configurations"]["3d_fullres"]
    assert full["architecture"]["network_class_name"] == "nnunet_logonet.network.logonet.LoGoNet"
    assert full["data_identifier"] == "nnUNetPlans_3d_fullres"  # shared with nnU-Net's default plans
    kwargs = full["architecture"]["arch_kwargs"]
    check_patch_size(full["patch_size"], kwargs["strides"], kwargs["local_grid"], kwargs.get("local_stages", 2))
    # thick slices: the slice axis (first after nnU-Net's transpose) is not halved at the first step
    assert kwargs["strides"][1][0] == 1 and kwargs["strides"][1][1] == 2
    assert full["logonet"]["estimated_memory_gb"] <= 8.0
    saved = json.loads((nnunet_dirs / "preprocessed" / "Dataset801_Fake" / "LoGoNetPlans.json").read_text())
    assert "2d" not in saved["configurations"]


def test_data_folder_is_shared_with_nnunet_plans_only_when_preprocessed_alike(nnunet_dirs, capsys):
    """nnUNetPlans planned with -overwrite_target_spacing keep their folder name nnUNetPlans_3d_fullres;
    LoGoNet's preprocessing used to write its own data (another spacing) there, replacing nnU-Net's."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner

    _fake_dataset(nnunet_dirs, 809, (1.5, 1.0, 1.0), (40, 48, 48))
    ExperimentPlanner(809, 8).plan_experiment()  # nnU-Net's default plans: the same preprocessing
    assert _plan(LoGoNetTinyPlanner, 809)["configurations"]["3d_fullres"]["data_identifier"] == \
        "nnUNetPlans_3d_fullres"
    ExperimentPlanner(809, 8, overwrite_target_spacing=[2.0, 2.0, 2.0]).plan_experiment()
    capsys.readouterr()
    _plan(LoGoNetTinyPlanner, 809)
    saved = json.loads((nnunet_dirs / "preprocessed" / "Dataset809_Fake" / "LoGoNetTinyPlans.json").read_text())
    assert saved["configurations"]["3d_fullres"]["data_identifier"] == "LoGoNetTinyPlans_3d_fullres"
    assert "preprocesses 3d_fullres differently (spacing)" in capsys.readouterr().out
    nnunet = json.loads((nnunet_dirs / "preprocessed" / "Dataset809_Fake" / "nnUNetPlans.json").read_text())
    assert nnunet["configurations"]["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]


def test_larger_memory_target_never_gives_smaller_patch(nnunet_dirs):
    from nnunet_logonet.planning.planners import LoGoNetPlanner

    _fake_dataset(nnunet_dirs, 802, (1.0, 1.0, 1.0), (200, 200, 200))
    previous = None
    for target in (2.0, 4.0, 8.0, 16.0, 40.0):
        patch = _plan(LoGoNetPlanner, 802, target)["configurations"]["3d_fullres"]["patch_size"]
        if previous is not None:
            assert all(p >= q for p, q in zip(patch, previous)), (target, patch, previous)
        previous = patch


def test_shrinking_follows_nnunets_rule_and_skips_no_valid_size(nnunet_dirs):
    """Prostate-like data (3.6 x 0.62 x 0.62 mm, median 20 x 320 x 320): the shrink loop used to take a
    whole multiple off the thick-slice axis (16 -> 8, skipping the valid 12) and to break ties towards
    it, planning [8, 224, 224] for LoGoNet-S. As in nnU-Net, ties go to the last axis and the step is
    the multiple the smaller patch needs."""
    from nnunet_logonet.planning.planners import LoGoNetPlanner, ULKANetPlanner

    _fake_dataset(nnunet_dirs, 810, (3.6, 0.62, 0.62), (20, 320, 320))
    full = _plan(LoGoNetPlanner, 810)["configurations"]["3d_fullres"]
    assert full["patch_size"] == [12, 192, 160], full["patch_size"]
    assert full["logonet"]["estimated_memory_gb"] <= 8.0
    full = _plan(ULKANetPlanner, 810)["configurations"]["3d_fullres"]
    assert full["patch_size"] == [16, 224, 224], full["patch_size"]  # was [8, 256, 256]: 61 % of the target
    assert 0.85 * 8.0 < full["logonet"]["estimated_memory_gb"] <= 8.0


def test_memory_target_too_small_is_a_clear_error(nnunet_dirs):
    from nnunet_logonet.planning.planners import LoGoNetPlanner, LoGoNetTinyPlanner, PlanningError

    _fake_dataset(nnunet_dirs, 803, (1.0, 1.0, 1.0), (200, 200, 200))
    with pytest.raises(PlanningError, match=r"-gpu_memory_target .* too small") as error:
        _plan(LoGoNetPlanner, 803, 0.05)
    needed, advised = re.search(r"needs about ([0-9.]+) GB.*Use -gpu_memory_target ([0-9.]+) or more",
                                str(error.value)).groups()
    assert float(advised) >= float(needed)  # the advice is a target that plans
    assert "or a smaller preset (-pl LoGoNetTinyPlanner)" in str(error.value)
    with pytest.raises(PlanningError, match=r"too small for LoGoNet-tiny") as error:
        _plan(LoGoNetTinyPlanner, 803, 0.0001)
    assert "(tiny is the smallest preset)" in str(error.value) and "LoGoNetTinyPlanner)" not in str(error.value)


def test_a_memory_target_of_zero_is_refused_before_planning():
    from nnunet_logonet.planning.planners import LoGoNetPlanner, PlanningError

    with pytest.raises(PlanningError, match="-gpu_memory_target must be positive, got 0"):
        LoGoNetPlanner(999, gpu_memory_target_in_gb=0)


def test_preprocessing_differences_name_plans_and_configuration_keys_compared_as_json():
    """Plans in memory hold tuples where the file holds lists: the same preprocessing either way."""
    from nnunet_logonet.planning.planners import preprocessing_differences

    plans = {"transpose_forward": [0, 1, 2], "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    config = {"spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"]}
    assert preprocessing_differences(plans, config, {**plans, "transpose_forward": (0, 1, 2)},
                                     {**config, "spacing": (1.0, 1.0, 1.0)}) == []
    assert preprocessing_differences(plans, config, {**plans, "transpose_forward": [2, 1, 0]},
                                     {**config, "normalization_schemes": ["ZScoreNormalization"]}) == \
        ["transpose_forward", "normalization_schemes"]


def test_tiny_planner_caps_patch_for_cpu(nnunet_dirs):
    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner

    _fake_dataset(nnunet_dirs, 804, (1.0, 1.0, 1.0), (300, 300, 300))
    full = _plan(LoGoNetTinyPlanner, 804)["configurations"]["3d_fullres"]
    assert np.prod(full["patch_size"]) <= 64 ** 3
    assert full["architecture"]["arch_kwargs"]["dims"][0] < 64


def test_tiny_planner_scales_the_initial_patch_to_its_cap_keeping_its_shape(nnunet_dirs):
    """Thin volumes (40 x 300 x 300): the slab-shaped initial patch is scaled down whole, and the
    local paths are not split along its thin axis."""
    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner

    _fake_dataset(nnunet_dirs, 825, (1.0, 1.0, 1.0), (40, 300, 300))
    full = _plan(LoGoNetTinyPlanner, 825)["configurations"]["3d_fullres"]
    assert full["patch_size"] == [16, 128, 128]
    assert full["architecture"]["arch_kwargs"]["local_grid"] == [1, 2, 2]


def test_with_memory_to_spare_the_patch_is_nnunets_initial_256_cube(nnunet_dirs):
    from nnunet_logonet.planning.planners import ULKANetPlanner

    _fake_dataset(nnunet_dirs, 826, (1.0, 1.0, 1.0), (300, 300, 300))
    assert _plan(ULKANetPlanner, 826, 100.0)["configurations"]["3d_fullres"]["patch_size"] == [256, 256, 256]


def test_data_folder_stays_shared_when_nnunet_plans_have_no_3d_fullres(nnunet_dirs):
    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner

    _, pre = _fake_dataset(nnunet_dirs, 823, (1.5, 1.0, 1.0), (40, 48, 48))
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {"data_identifier": "nnUNetPlans_2d"}}}))
    assert _plan(LoGoNetTinyPlanner, 823)["configurations"]["3d_fullres"]["data_identifier"] == \
        "nnUNetPlans_3d_fullres"


def test_every_planner_can_be_chosen_on_the_command_line(nnunet_dirs):
    from nnunet_logonet.planning.cli import main

    _, pre = _fake_dataset(nnunet_dirs, 824, (1.5, 1.0, 1.0), (40, 48, 48))
    assert main(["-d", "824", "-pl", "ULKANetPlanner", "-c", "3d_fullres", "--no_pp"]) in (0, None)
    plans = json.loads((pre / "ULKANetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith(".ULKANet")


def test_2d_only_dataset_is_refused_with_advice(nnunet_dirs):
    from nnunet_logonet.planning.planners import LoGoNetPlanner, PlanningError

    _fake_dataset(nnunet_dirs, 805, (999.0, 0.8, 0.8), (1, 256, 256))
    with pytest.raises(PlanningError, match="3D only.*nnUNetv2_plan_and_preprocess"):
        _plan(LoGoNetPlanner, 805)


# ------------------------------------------------------------------------- logonet_plan_and_preprocess
@pytest.mark.parametrize("argv, message", [
    (["-np", "0"], "-np must be at least 1"),
    (["-npfp", "0"], "-npfp must be at least 1"),
    (["-c", "3d_fulres"], "-c 3d_fulres: not a configuration"),
    (["-c", "2d"], "-c 2d: LoGoNet is 3D only"),  # used to exit 0 with nothing preprocessed
    (["-overwrite_target_spacing", "-1", "1", "1"], "3 positive numbers"),
    (["-overwrite_target_spacing", "0", "0", "0"], "3 positive numbers"),
    (["-overwrite_target_spacing", "1", "1"], "3 positive numbers"),  # two values: not a 3D spacing
    (["-np", "1", "2"], "one per configuration"),  # 2 values for 1 configuration: nnU-Net crashes on it
    (["-overwrite_plans_name", "a/b"], "without '/'"),
    (["-overwrite_plans_name", "nnUNetPlans"], "that is nnU-Net's default plans name, the baseline's"),
])
def test_bad_arguments_stop_before_any_folder_is_touched(nnunet_dirs, capsys, argv, message):
    """nnU-Net empties the shared preprocessed folder before it checks -np (0 deleted nnUNetPlans' data);
    a mistyped -c used to pass with nothing preprocessed, a negative spacing to hang the planner."""
    from nnunet_logonet.planning.cli import main

    raw, pre = _fake_dataset(nnunet_dirs, 806, (1.0, 1.0, 1.0), (40, 40, 40))
    shared = pre / "nnUNetPlans_3d_fullres"
    shared.mkdir()
    (shared / "case0.pkl").write_bytes(b"kept")
    with pytest.raises(SystemExit) as stop:
        main(["-d", "806", "-c", "3d_fullres", "--force_pp", *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert (shared / "case0.pkl").read_bytes() == b"kept"
    assert not (pre / "LoGoNetPlans.json").exists()


def test_dataset_argument_takes_the_id_or_the_folder_name_nnunet_prints():
    """nnU-Net names a dataset by its folder in plans, logs and messages; -d takes that as well as the ID."""
    from nnunet_logonet.planning.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-d", "611", "Dataset012_Liver", "7"]).d == [611, 12, 7]
    for bad in ("Dataset_Phantom", "Task09_Spleen", "1234", "611x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["-d", bad])


@pytest.mark.parametrize("edit, message", [
    (lambda raw: (raw / "dataset.json").unlink(), "dataset.json does not exist"),
    (lambda raw: (raw / "dataset.json").write_text('{"labels": {'), "is not valid JSON"),
    (lambda raw: _edit_json(raw, channel_names=None), "no 'channel_names' entry"),
    (lambda raw: _edit_json(raw, labels={"liver": 1}), "'background' to 0"),
    (lambda raw: _edit_json(raw, file_ending=".nii"), "no file ends with file_ending '.nii'.*found: .nii.gz"),
])
def test_dataset_json_mistakes_name_the_file_and_the_fix(nnunet_dirs, capsys, edit, message):
    from nnunet_logonet.planning.cli import main

    raw, pre = _fake_dataset(nnunet_dirs, 807, (1.0, 1.0, 1.0), (40, 40, 40))
    edit(raw)
    assert main(["-d", "807", "-npfp", "1"]) == 2
    err = capsys.readouterr().err
    assert str(raw) in err
    assert re.search(message, err), err
    assert not (pre / "LoGoNetPlans.json").exists()


def _edit_json(raw, **changes):
    path = raw / "dataset.json"
    dataset = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            dataset.pop(key)
        else:
            dataset[key] = value
    path.write_text(json.dumps(dataset))


def test_shared_data_is_reused_only_while_the_raw_cases_are_unchanged(nnunet_dirs):
    """The 3d_fullres data shared with nnUNetPlans is reused only if it holds exactly the raw cases,
    each preprocessed after its raw files were last written (cases added, a label edited: redone)."""
    import os

    from nnunet_logonet.planning.cli import raw_case_files, shared_data_is_ready

    raw, pre = _fake_dataset(nnunet_dirs, 808, (1.0, 1.0, 1.0), (40, 40, 40))
    plans = _shared_folder(raw, pre)
    gt = pre / "gt_segmentations"
    later = (pre / "nnUNetPlans_3d_fullres" / "case0.pkl").stat().st_mtime  # when the data was preprocessed
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    # what a label copy killed before its rename leaves is not a case (nnU-Net copied dataset.json here)
    (pre / "dataset.json").write_text((raw / "dataset.json").read_text())
    (gt / "case1.nii.gz.tmp999999").write_bytes(b"")
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    (gt / "case1.nii.gz.tmp999999").unlink()
    (gt / "case1.nii.gz").unlink()  # a label copy missing
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    (gt / "case1.nii.gz").write_bytes(b"")

    os.utime(raw / "labelsTr" / "case2.nii.gz", (later + 10, later + 10))  # a label edited after preprocessing
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    os.utime(raw / "labelsTr" / "case2.nii.gz", (later - 10, later - 10))
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))

    arrays = (pre / "nnUNetPlans_3d_fullres" / "case3.npz").read_bytes()
    (pre / "nnUNetPlans_3d_fullres" / "case3.npz").unlink()  # a case's arrays deleted, its .pkl left
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    (pre / "nnUNetPlans_3d_fullres" / "case3.npz").write_bytes(arrays)
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))

    for name in ("imagesTr/case4_0000.nii.gz", "labelsTr/case4.nii.gz"):  # a case added
        (raw / name).write_bytes((raw / name.replace("4", "3")).read_bytes())
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))


def _shared_folder(raw, pre, stored_shape=(4, 4, 4)):
    """nnUNetPlans' 3d_fullres data (1 mm) for every raw case of a ``_fake_dataset``, preprocessed after the raw
    files were written, with the label copies in gt_segmentations; returns plans of the same preprocessing.
    Each case has nnU-Net's numpy data of ``stored_shape`` (its raw images are 4x4x4, so 4x4x4 at these plans'
    1 mm)."""
    import os
    import pickle

    config = {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [1.0, 1.0, 1.0]}
    plans = {"configurations": {"3d_fullres": config}, "transpose_forward": [0, 1, 2]}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    data, gt = pre / "nnUNetPlans_3d_fullres", pre / "gt_segmentations"
    data.mkdir()
    gt.mkdir()
    for label in (raw / "labelsTr").iterdir():
        case = label.name[: -len(".nii.gz")]
        (gt / label.name).write_bytes(b"")
        np.savez_compressed(data / f"{case}.npz", data=np.zeros((1, *stored_shape), np.float32),
                            seg=np.zeros((1, *stored_shape), np.int8))
        with open(data / f"{case}.pkl", "wb") as f:
            pickle.dump({"spacing": [1.0, 1.0, 1.0], "shape_after_cropping_and_before_resampling": [4, 4, 4]}, f)
    later = max(f.stat().st_mtime for f in raw.rglob("*.nii.gz")) + 10
    for f in data.iterdir():
        os.utime(f, (later, later))
    return plans


def test_a_label_copy_cut_short_does_not_stand_in_for_a_missing_one_before_dataset_json_is_copied(nnunet_dirs):
    """Until nnU-Net copies dataset.json into the preprocessed folder the file ending is unknown; a
    ``<case>.nii.gz.tmp<pid>`` left by a killed label copy must still not count as that case's label, or
    training would start without the case's ground truth."""
    from nnunet_logonet.planning.cli import raw_case_files, shared_data_is_ready

    raw, pre = _fake_dataset(nnunet_dirs, 816, (1.0, 1.0, 1.0), (40, 40, 40))
    plans = _shared_folder(raw, pre)
    assert not (pre / "dataset.json").exists()
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    (pre / "gt_segmentations" / "case1.nii.gz").unlink()
    (pre / "gt_segmentations" / "case1.nii.gz.tmp999").write_bytes(b"")
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))


def test_shared_data_preprocessed_at_another_spacing_is_not_reused(nnunet_dirs):
    """Other plans of the same data folder name (e.g. moved between datasets) may have written it at another
    spacing: its cases' shapes then differ from what these plans' resampling gives, and it is redone rather
    than trained on at the wrong spacing."""
    from nnunet_logonet.planning.cli import raw_case_files, shared_data_is_ready

    raw, pre = _fake_dataset(nnunet_dirs, 817, (1.0, 1.0, 1.0), (40, 40, 40))
    plans = _shared_folder(raw, pre)  # 1 mm: what these plans give
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    for f in (pre / "gt_segmentations", pre / "nnUNetPlans_3d_fullres", pre / "nnUNetPlans.json"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    plans = _shared_folder(raw, pre, stored_shape=(2, 2, 2))  # resampled to 2 mm by other plans
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))


def test_shared_data_is_not_reused_when_nnunet_plans_preprocess_it_differently(nnunet_dirs):
    """nnUNetPlans planned with -overwrite_target_spacing 2 2 2 keep the folder name nnUNetPlans_3d_fullres:
    their data, in a folder of the same name, is not LoGoNet's 1 mm data."""
    from nnunet_logonet.planning.cli import raw_case_files, shared_data_is_ready

    raw, pre = _fake_dataset(nnunet_dirs, 818, (1.0, 1.0, 1.0), (40, 40, 40))
    plans = _shared_folder(raw, pre)
    assert shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))
    nnunet = deepcopy(plans)
    nnunet["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    (pre / "nnUNetPlans.json").write_text(json.dumps(nnunet))
    assert not shared_data_is_ready(pre, plans, "3d_fullres", raw_case_files(raw))


@pytest.fixture()
def preprocess_calls(monkeypatch):
    """nnU-Net's preprocessing entry point replaced by a recorder of its arguments."""
    from nnunetv2.experiment_planning import plan_and_preprocess_api

    calls = []
    monkeypatch.setattr(plan_and_preprocess_api, "preprocess_dataset",
                        lambda dataset_id, plans_identifier, configurations, num_processes:
                        calls.append((dataset_id, plans_identifier, list(configurations), list(num_processes))))
    return calls


def test_np_given_per_configuration_keeps_the_value_of_each_configuration_still_to_do(nnunet_dirs, monkeypatch,
                                                                                     preprocess_calls):
    """-c 3d_fullres 3d_lowres -np 3 5 with 3d_fullres reused from nnUNetPlans: nnU-Net gets one
    configuration and its own -np (it stops on lists of different lengths)."""
    from nnunet_logonet.planning import cli

    _fake_dataset(nnunet_dirs, 819, (1.0, 1.0, 1.0), (300, 300, 300))  # large enough for a 3d_lowres
    monkeypatch.setattr(cli, "shared_data_is_ready", lambda pre, plans, c, raw_cases=None: c == "3d_fullres")
    assert cli.main(["-d", "819", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "3d_lowres",
                     "-npfp", "1", "-np", "3", "5"]) == 0
    assert preprocess_calls == [(819, "LoGoNetTinyPlans", ["3d_lowres"], [5])]


def test_force_pp_preprocesses_data_that_could_be_reused(nnunet_dirs, monkeypatch, capsys, preprocess_calls):
    """--force_pp (docs/planning.md) redoes the shared nnUNetPlans_3d_fullres data even when it is ready
    (e.g. after the raw images were replaced keeping their dates)."""
    from nnunet_logonet.planning import cli

    _fake_dataset(nnunet_dirs, 820, (1.0, 1.0, 1.0), (40, 40, 40))
    monkeypatch.setattr(cli, "shared_data_is_ready", lambda *args, **kwargs: True)
    argv = ["-d", "820", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "-npfp", "1", "-np", "1"]
    assert cli.main(argv) == 0
    assert preprocess_calls == [] and "3d_fullres: reusing the data" in capsys.readouterr().out
    assert cli.main([*argv, "--force_pp"]) == 0
    assert preprocess_calls == [(820, "LoGoNetTinyPlans", ["3d_fullres"], [1])]


def test_a_second_run_on_the_same_dataset_is_refused_while_the_first_holds_it(nnunet_dirs, capsys, preprocess_calls):
    """Two planners started at once on one dataset (LoGoNetTinyPlanner and ULKANetPlanner) each rebuilt the data
    folder they share under the other, and both failed half-way ("Error while creating the NDArray"), leaving 6 of
    10 cases. The second is refused, naming the first; the lock goes with the process that holds it."""
    import fcntl

    from nnunet_logonet.planning import cli

    _, pre = _fake_dataset(nnunet_dirs, 821, (1.0, 1.0, 1.0), (40, 40, 40))
    argv = ["-d", "821", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "-npfp", "1", "-np", "1"]
    lock = nnunet_dirs / "preprocessed" / ".Dataset821_Fake.logonet_plan_and_preprocess.lock"
    with open(lock, "a+") as held:  # the first run's lock (another open file: flock conflicts in-process too)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (f"another logonet_plan_and_preprocess (pid 4242) is planning or preprocessing Dataset821_Fake ({lock})"
            in err and "Wait for it to finish, then run this command again" in err)
    assert not (pre / "LoGoNetTinyPlans.json").exists() and preprocess_calls == []
    assert cli.main(argv) == 0  # released
    assert preprocess_calls == [(821, "LoGoNetTinyPlans", ["3d_fullres"], [1])]


def test_a_preprocessing_that_fails_names_a_concurrent_one_as_a_cause(nnunet_dirs, monkeypatch, capsys):
    """nnU-Net's own nnUNetv2_plan_and_preprocess, run beside ours, deletes and rebuilds the shared data folder (our
    lock cannot stop it): ours then failed with "Error while creating the NDArray" and a hint blaming the raw data.
    --no_pp names the command that preprocesses before training."""
    from nnunetv2.experiment_planning import plan_and_preprocess_api

    from nnunet_logonet.planning import cli

    _fake_dataset(nnunet_dirs, 822, (1.0, 1.0, 1.0), (40, 40, 40))

    def rebuilt_underneath(*args):
        raise RuntimeError("Error while creating the NDArray")

    monkeypatch.setattr(plan_and_preprocess_api, "preprocess_dataset", rebuilt_underneath)
    argv = ["-d", "822", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "-npfp", "1", "-np", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "preprocessing of Dataset822_Fake failed: RuntimeError: Error while creating the NDArray" in err
    assert "Or another preprocessing of Dataset822_Fake ran at the same time (nnU-Net's" in err
    assert cli.main([*argv, "--no_pp"]) == 0
    assert ("Planned LoGoNetTinyPlans; not preprocessed (--no_pp). Before training, preprocess: nnUNetv2_preprocess "
            "-d 822 -plans_name LoGoNetTinyPlans -c 3d_fullres (or this command without --no_pp)."
            in capsys.readouterr().out)
    assert cli.main(["-d", "822", "-pl", "LoGoNetTinyPlanner", "-npfp", "1", "--no_pp"]) == 0  # -c's default
    assert "nnUNetv2_preprocess -d 822 -plans_name LoGoNetTinyPlans -c 3d_fullres (or" in capsys.readouterr().out


def test_no_requested_configuration_in_the_plans_is_an_error(nnunet_dirs, capsys, preprocess_calls):
    """-c 3d_lowres on data too small for a low-resolution stage: nothing is preprocessed, so the command
    must fail (exit 2) rather than look successful to a script that then trains."""
    from nnunet_logonet.planning.cli import main

    _fake_dataset(nnunet_dirs, 821, (1.0, 1.0, 1.0), (40, 40, 40))
    assert main(["-d", "821", "-pl", "LoGoNetTinyPlanner", "-c", "3d_lowres", "-npfp", "1"]) == 2
    assert "none of -c 3d_lowres is in LoGoNetTinyPlans" in capsys.readouterr().err
    assert preprocess_calls == []


@pytest.mark.parametrize("variable", ["nnUNet_raw", "nnUNet_preprocessed"])
def test_an_nnunet_folder_variable_naming_a_file_is_refused(nnunet_dirs, monkeypatch, capsys, variable):
    """A data folder variable set to a file (a typo, a path swapped with dataset.json) is named as such,
    instead of nnU-Net's 'could not find dataset' or a NotADirectoryError deep inside it."""
    from nnunet_logonet.planning.cli import main

    _fake_dataset(nnunet_dirs, 822, (1.0, 1.0, 1.0), (40, 40, 40))
    not_a_folder = nnunet_dirs / "a_file"
    not_a_folder.write_text("")
    monkeypatch.setenv(variable, str(not_a_folder))
    with pytest.raises(SystemExit) as stop:
        main(["-d", "822", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "--no_pp"])
    assert stop.value.code == 2
    assert f"{variable}={not_a_folder} is a file, not a folder" in capsys.readouterr().err


def test_files_an_interrupted_run_cut_short_are_made_again(nnunet_dirs, capsys):
    """nnU-Net writes the fingerprint, the plans and the gt_segmentations label copies in place. A rerun
    stopped with a bare JSON error on a fingerprint or plans file cut short, and kept a label copy cut
    short (nnU-Net copies a label only when its copy is older), so validation Dice used a truncated label."""
    from nnunet_logonet.phantom.writer import write_dataset
    from nnunet_logonet.planning.cli import main

    raw = write_dataset(nnunet_dirs / "raw", 812, num_train=2, num_test=0, num_unlabeled=0, size=32, progress=False)
    pre = nnunet_dirs / "preprocessed" / raw.name
    fingerprint, plans = pre / "dataset_fingerprint.json", pre / "LoGoNetTinyPlans.json"
    label = sorted((raw / "labelsTr").iterdir())[1]
    copy = pre / "gt_segmentations" / label.name
    copy.parent.mkdir(parents=True)
    # what a run killed while writing each leaves (all three written after the raw data)
    fingerprint.write_text('{"spacings": [[1.0, 1.0')
    plans.write_text('{"dataset_name": "Dataset812_Phantom", "configurations": {"3d_f')
    copy.write_bytes(label.read_bytes()[: label.stat().st_size // 2])
    assert main(["-d", "812", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "-npfp", "1", "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{fingerprint} is not valid JSON" in out and "extracting it again" in out
    assert f"{plans} is not valid JSON" in out and "kept as LoGoNetTinyPlans.json.unreadable" in out
    assert "copied 1 label(s) again" in out and label.name.replace(".nii.gz", "") in out
    assert json.loads(fingerprint.read_text())["spacings"] and json.loads(plans.read_text())["configurations"]
    assert all((pre / "gt_segmentations" / f.name).read_bytes() == f.read_bytes() for f in (raw / "labelsTr").iterdir())
    assert (pre / "LoGoNetTinyPlans.json.unreadable").is_file()
    assert [p.name for p in (pre / "gt_segmentations").iterdir() if p.name.startswith(".")] == []


def test_plans_are_written_whole_keeping_a_users_own_configurations_as_nnunet_does(nnunet_dirs, monkeypatch):
    """The plans file is written as nnU-Net 2.8's save_plans writes it (a configuration only the old file
    has, e.g. one a user added, is kept; the planned ones are replaced), but whole: a failed write leaves
    the old file as it was, where nnU-Net's in-place write left half a file."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnunet_logonet import workfolders
    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner

    _fake_dataset(nnunet_dirs, 815, (1.5, 1.0, 1.0), (40, 48, 48))
    planner = LoGoNetTinyPlanner(815)
    planner.plan_experiment()
    plans_file = nnunet_dirs / "preprocessed" / "Dataset815_Fake" / "LoGoNetTinyPlans.json"
    old = json.loads(plans_file.read_text())
    old["configurations"]["3d_fullres_bs4"] = {"inherits_from": "3d_fullres", "batch_size": 4}
    old["configurations"]["3d_fullres"]["batch_size"] = 99
    plans_file.write_text(json.dumps(old, indent=4))

    new = json.loads(plans_file.read_text())
    del new["configurations"]["3d_fullres_bs4"]
    new["configurations"]["3d_fullres"]["batch_size"] = 2
    planner._write_plans_whole(deepcopy(new))
    ours = plans_file.read_text()
    plans_file.write_text(json.dumps(old, indent=4))
    ExperimentPlanner.save_plans(planner, deepcopy(new))  # nnU-Net's own, on the same old file
    assert json.loads(ours) == json.loads(plans_file.read_text())
    assert list(json.loads(ours)["configurations"]) == list(json.loads(plans_file.read_text())["configurations"])
    saved = json.loads(ours)["configurations"]
    assert saved["3d_fullres"]["batch_size"] == 2 and saved["3d_fullres_bs4"]["batch_size"] == 4

    def half_then_full_disk(path, text, *args, **kwargs):
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("disk full")

    before = plans_file.read_bytes()
    monkeypatch.setattr(workfolders.Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="disk full"):
        planner._write_plans_whole(deepcopy(new))
    assert plans_file.read_bytes() == before
    assert sorted(p.name for p in plans_file.parent.iterdir() if ".tmp" in p.name) == []


def test_unreadable_nnunet_plans_give_logonet_its_own_data_folder(nnunet_dirs, capsys):
    from nnunet_logonet.planning.planners import LoGoNetTinyPlanner

    _fake_dataset(nnunet_dirs, 813, (1.5, 1.0, 1.0), (40, 48, 48))
    (nnunet_dirs / "preprocessed" / "Dataset813_Fake" / "nnUNetPlans.json").write_text('{"configurations": {"3d')
    plans = _plan(LoGoNetTinyPlanner, 813)
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "LoGoNetTinyPlans_3d_fullres"
    assert "nnUNetPlans.json unreadable" in capsys.readouterr().out


def test_large_preset_planner_writes_logonet_l_plans_under_its_own_24_gb_target(nnunet_dirs):
    """README and docs/msd.md: -pl LoGoNetLPlanner writes LoGoNetLPlans, the paper's L preset, planned
    against 24 GB by default (docs/planning.md), where S keeps to 8 GB on the same data."""
    from nnunet_logonet.network.presets import arch_kwargs_for_preset
    from nnunet_logonet.planning.planners import LoGoNetLPlanner, LoGoNetPlanner

    _fake_dataset(nnunet_dirs, 812, (1.0, 1.0, 1.0), (160, 320, 320))
    large = _plan(LoGoNetLPlanner, 812)["configurations"]["3d_fullres"]
    small = _plan(LoGoNetPlanner, 812)["configurations"]["3d_fullres"]
    saved = json.loads((nnunet_dirs / "preprocessed" / "Dataset812_Fake" / "LoGoNetLPlans.json").read_text())
    assert saved["plans_name"] == "LoGoNetLPlans" and saved["configurations"]["3d_fullres"]["logonet"]["preset"] == "L"
    strides = large["architecture"]["arch_kwargs"]["strides"]
    reference = arch_kwargs_for_preset("L", strides)
    for key in ("dims", "depths", "decoder_channels"):  # the paper's L (Table 9), not S's [64..512] / [3, 4, 6, 3]
        assert large["architecture"]["arch_kwargs"][key] == reference[key], key
    assert large["architecture"]["arch_kwargs"]["depths"] == [3, 3, 24, 3]
    assert 8.0 < large["logonet"]["estimated_memory_gb"] <= 24.0
    assert (large["logonet"]["gpu_memory_target_gb"], small["logonet"]["gpu_memory_target_gb"]) == (24.0, 8.0)
    assert small["logonet"]["estimated_memory_gb"] <= 8.0
    assert np.prod(large["patch_size"]) > np.prod(small["patch_size"])


def test_plans_name_and_target_spacing_given_on_the_command_line_get_their_own_plans_and_data(nnunet_dirs, capsys):
    """docs/msd.md: -overwrite_plans_name keeps pretrained and from-scratch runs side by side; docs/planning.md:
    with -overwrite_target_spacing the plans get their own data folder instead of nnUNetPlans' shared one."""
    from nnunet_logonet.planning.cli import main

    _, pre = _fake_dataset(nnunet_dirs, 813, (1.5, 1.0, 1.0), (40, 48, 48))
    assert main(["-d", "813", "-pl", "LoGoNetTinyPlanner", "-c", "2d", "3d_fullres", "--no_pp",
                 "-overwrite_plans_name", "LoGoNetSSLPlans", "-overwrite_target_spacing", "2", "2", "2"]) in (0, None)
    assert "configuration 2d is skipped" in capsys.readouterr().out  # asked for beside a 3D one: a message
    plans = json.loads((pre / "LoGoNetSSLPlans.json").read_text())
    assert plans["plans_name"] == "LoGoNetSSLPlans" and not (pre / "LoGoNetTinyPlans.json").exists()
    full = plans["configurations"]["3d_fullres"]
    assert full["spacing"] == [2.0, 2.0, 2.0] and full["data_identifier"] == "LoGoNetSSLPlans_3d_fullres"


def test_an_unreadable_image_is_one_message_pointing_to_the_integrity_check(nnunet_dirs, capsys):
    """docs/planning.md: an error of nnU-Net's fingerprint extraction on bad data is reported in one message
    that names the dataset and points to --verify_dataset_integrity (nnU-Net's own is a worker's traceback)."""
    from nnunet_logonet.phantom.writer import write_dataset
    from nnunet_logonet.planning.cli import main

    raw = write_dataset(nnunet_dirs / "raw", 814, num_train=2, num_test=0, num_unlabeled=0, size=32, progress=False)
    broken = sorted((raw / "imagesTr").iterdir())[0]
    broken.write_bytes(b"not a NIfTI image")
    assert main(["-d", "814", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "-npfp", "1", "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint extraction of Dataset814_Phantom failed" in err and "at the same time" not in err
    assert f"Check the raw dataset in {raw}" in err and "--verify_dataset_integrity" in err
    assert str(broken) in err.splitlines()[-2]  # the message itself names the file (nnU-Net's reader error)
    assert not (nnunet_dirs / "preprocessed" / raw.name / "dataset_fingerprint.json").exists()
    # given the flag already, the hint does not ask for it again
    main(["-d", "814", "-pl", "LoGoNetTinyPlanner", "-c", "3d_fullres", "-npfp", "1", "-np", "1",
          "--verify_dataset_integrity"])
    err = capsys.readouterr().err
    assert "run again with --verify_dataset_integrity" not in err and "fix what it names" in err
