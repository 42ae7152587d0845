"""LoGoNetTrainer refuses a configuration its plans lack (2d, 3d_lowres, 3d_cascade_fullres) with a message
naming the plans, the configurations they have and the fix, before nnU-Net creates anything."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_logonet.network.presets import arch_kwargs_for_preset
from nnunet_logonet.training.trainer import (
    LoGoNetTrainer,
    LoGoNetTrainer_demoQuick,
    PlansMismatchError,
    ULKANetTrainer,
    check_plans_configuration,
)

DATASET = "Dataset910_Phantom"


#: tiny's strides for a thick-slice patch such as [12, 32, 32]: no pooling along z
THICK_SLICE_STRIDES = [[1, 1, 1]] + [[1, 2, 2]] * 5


def _plans(strides=None, batch_size: int = 2, **configurations: list[int]) -> dict:
    """The keys the checks read: names, and per configuration the network, its patch and batch size."""
    def arch(patch):
        kwargs = arch_kwargs_for_preset("tiny", strides or THICK_SLICE_STRIDES) if len(patch) == 3 else {}
        return {"network_class_name": "nnunet_logonet.network.logonet.LoGoNet", "arch_kwargs": kwargs,
                "_kw_requires_import": []}
    return {"dataset_name": DATASET, "plans_name": "LoGoNetTinyPlans",
            "configurations": {name: {"patch_size": patch, "batch_size": batch_size, "architecture": arch(patch),
                                      "data_identifier": f"LoGoNetTinyPlans_{name}"}
                               for name, patch in configurations.items()}}


@pytest.mark.parametrize("trainer", [LoGoNetTrainer, LoGoNetTrainer_demoQuick, ULKANetTrainer])
@pytest.mark.parametrize("configuration, fix", [("2d", "nnU-Net's own trainer and plans"),
                                                ("3d_lowres", "only where nnU-Net's would"),
                                                ("3d_cascade_fullres", "these plans have none")])
def test_configuration_missing_from_the_plans_is_named_with_the_fix(tmp_path, monkeypatch, trainer,
                                                                    configuration, fix):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False}
    with pytest.raises(PlansMismatchError) as error:
        trainer(plans, configuration, 0, {"labels": {"background": 0, "a": 1}}, torch.device("cpu"))
    message = str(error.value)
    assert f"no configuration '{configuration}'" in message and "LoGoNetTinyPlans" in message
    assert "(available: 3d_fullres)" in message and fix in message
    assert f"nnUNetv2_train 910 3d_fullres FOLD -tr {trainer.__name__} -p LoGoNetTinyPlans" in message
    assert list(tmp_path.iterdir()) == []


def test_2d_configuration_in_the_plans_is_refused_as_2d():
    manager = PlansManager(_plans(**{"2d": [64, 64], "3d_fullres": [12, 32, 32]}))
    with pytest.raises(PlansMismatchError, match=r"'2d' is a 2D configuration.*LoGoNet is a 3D network"):
        check_plans_configuration(manager, "2d")
    check_plans_configuration(manager, "3d_fullres")  # a 3D configuration passes


def test_the_command_offered_names_the_first_3d_configuration_of_the_plans():
    manager = PlansManager(_plans(**{"3d_fullres": [12, 32, 32], "3d_lowres": [12, 32, 32]}))
    with pytest.raises(PlansMismatchError, match="nnUNetv2_train 910 3d_fullres FOLD -tr LoGoNetTrainer"):
        check_plans_configuration(manager, "3d_cascade_fullres")


def test_plans_without_strides_say_to_plan_again(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = _plans(**{"3d_fullres": [12, 32, 32]})
    del plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    with pytest.raises(PlansMismatchError, match="has no 'strides' in its arch_kwargs; plan again with "
                                                 "logonet_plan_and_preprocess"):
        LoGoNetTrainer({**plans, "continue_training": False}, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}},
                       torch.device("cpu"))


def test_network_built_from_plans_is_channels_last_and_only_from_logonet_plans():
    """nnUNetv2_predict builds the network through this static method alone (no trainer constructor runs):
    it must refuse a U-Net's plans itself, and give the fast channels-last layout."""
    manager = PlansManager(_plans(**{"3d_fullres": [32, 32, 32]}))
    config = manager.get_configuration("3d_fullres")
    network = LoGoNetTrainer.build_network_architecture(manager, config, 1, 2, enable_deep_supervision=False)
    weights = [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    unet = _plans(**{"3d_fullres": [32, 32, 32]})
    unet["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    manager = PlansManager(unet)
    with pytest.raises(PlansMismatchError, match="PlainConvUNet"):
        LoGoNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 2)


def test_initialize_checks_the_pretrained_weights_of_the_command_line(monkeypatch):
    """nnU-Net hands -pretrained_weights to its loader only, which stops at the first missing key: the
    trainer's initialize reads the file from the command line and checks it whole first."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    seen = []
    trainer = object.__new__(LoGoNetTrainer)
    monkeypatch.setattr(LoGoNetTrainer, "check_preprocessed_data", lambda self: seen.append("data"))
    monkeypatch.setattr(nnUNetTrainer, "initialize", lambda self: seen.append("nnU-Net"))
    monkeypatch.setattr(LoGoNetTrainer, "check_pretrained_weights", lambda self, argv: seen.append(argv))
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "1", "3d_fullres", "0", "-pretrained_weights", "w.pth"])
    trainer.initialize()
    assert seen == ["data", "nnU-Net", ["nnUNetv2_train", "1", "3d_fullres", "0", "-pretrained_weights", "w.pth"]]


def test_a_budget_of_no_epochs_is_refused():
    from nnunet_logonet.training.trainer import with_budget

    with pytest.raises(ValueError, match="LoGoNetTrainer_0epochs: epochs"):
        with_budget(LoGoNetTrainer, "LoGoNetTrainer_0epochs", 0)


def test_plans_without_any_3d_configuration_say_to_plan_for_logonet():
    with pytest.raises(PlansMismatchError, match="logonet_plan_and_preprocess -d 910 -pl"):
        check_plans_configuration(PlansManager(_plans(**{"2d": [64, 64]})), "3d_fullres")


def test_a_patch_the_planned_network_cannot_take_is_refused_naming_the_plans_and_valid_sizes(tmp_path, monkeypatch):
    """It used to pass the constructor and stop at the first forward, after the data loaders had started,
    with the network's message (no plans file, no fix)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**_plans(strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, **{"3d_fullres": [48, 48, 48]}), "continue_training": False}
    with pytest.raises(PlansMismatchError) as error:
        LoGoNetTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}}, torch.device("cpu"))
    message = str(error.value)
    assert f"$nnUNet_preprocessed/{DATASET}/LoGoNetTinyPlans.json" in message and "patch size [48, 48, 48]" in message
    assert "[32, 32, 32] (round down" in message and "[64, 64, 64] (round up)" in message
    assert "logonet_plan_and_preprocess" in message
    assert list(tmp_path.iterdir()) == []


def test_a_bad_architecture_in_the_plans_is_named_without_a_patch_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = _plans(**{"3d_fullres": [12, 32, 32]})
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["local_stages"] = 5
    with pytest.raises(PlansMismatchError) as error:
        LoGoNetTrainer({**plans, "continue_training": False}, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}},
                       torch.device("cpu"))
    message = str(error.value)
    assert "local_stages must be an int in [1, 4], got 5; plan again with logonet_plan_and_preprocess" in message
    assert "patch_size" not in message


#: tiny's strides: 32^3 leaves the global bottleneck one voxel
POOLING_EVERYWHERE = [[1, 1, 1]] + [[2, 2, 2]] * 5
#: no pooling after the third stage: a 16^3 patch leaves the global bottleneck 2^3 voxels, but each local path
#: sees an 8^3 sub-crop and pools it by 8 to one voxel
POOLING_EARLY = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("strides, patch", [(POOLING_EVERYWHERE, [32, 32, 32]), (POOLING_EARLY, [16, 16, 16])],
                         ids=["global-bottleneck", "local-path"])
@pytest.mark.parametrize("norm, batch_size, refused", [("instance", 2, True), ("batch", 1, True),
                                                       ("batch", 2, False), (None, 1, True), (None, 2, False)])
def test_a_patch_leaving_a_one_voxel_deepest_map_is_refused_where_its_norms_cannot_train(
        tmp_path, monkeypatch, strides, patch, norm, batch_size, refused):
    """A one-voxel deepest map, global or in a local path: instance norm cannot train on it at all, batch norm
    only with a batch of two or more (PyTorch stopped inside the norm at the first training step)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = _plans(strides=strides, batch_size=batch_size, **{"3d_fullres": patch})
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    if norm is None:  # plans without the key: the networks' default, batch norm
        arch.pop("norm", None)
        norm = "batch"
    else:
        arch["norm"] = norm
    assert (arch["local_grid"], arch["local_stages"]) == ([2, 2, 2], 2)
    make = lambda: LoGoNetTrainer({**plans, "continue_training": False}, "3d_fullres", 0,  # noqa: E731
                                  {"labels": {"background": 0, "a": 1}}, torch.device("cpu"))
    if not refused:
        make()
        return
    with pytest.raises(PlansMismatchError, match=rf"patch_size \[{patch[0]}, {patch[1]}, {patch[2]}\] leaves the network's "
                                                 rf"deepest feature map a single voxel, so its {norm} norms would "
                                                 r"normalise one value per channel.*Double the patch size on one axis"):
        make()


def test_plans_for_the_other_network_are_refused_naming_its_planner(tmp_path, monkeypatch):
    """ULKANetTrainer on LoGoNet's plans (and the reverse) stops in the constructor, naming the planner to
    run, before nnU-Net creates the output folder."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False}
    with pytest.raises(PlansMismatchError, match=r"(?s)describe nnunet_logonet\.network\.logonet\.LoGoNet, not "
                                                 r"ULKANet.*-pl ULKANetPlanner.*-p ULKANetPlans"):
        ULKANetTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}}, torch.device("cpu"))
    ulka = plans["configurations"]["3d_fullres"]["architecture"]
    ulka["network_class_name"] = "nnunet_logonet.network.ulkanet.ULKANet"
    for key in ("local_grid", "local_stages"):
        ulka["arch_kwargs"].pop(key)
    with pytest.raises(PlansMismatchError, match=r"(?s)not LoGoNet.*-pl LoGoNetPlanner.*-p LoGoNetPlans"):
        LoGoNetTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}}, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []
    ULKANetTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}}, torch.device("cpu"))


@pytest.mark.parametrize("name", ["LoGoNetTrainer_demo", "LoGoNetTrainer_demoQuick", "LoGoNetSSLTrainer_demo",
                                  "LoGoNetSSLTrainer_demoQuick"])
def test_demo_trainers_checkpoint_every_epoch_so_a_resume_loses_little(tmp_path, monkeypatch, name):
    """The SSL demo trainers used to keep nnU-Net's save_every of 50: a --c of a 14-epoch run fell back
    to checkpoint_best or started over."""
    import nnunet_logonet.training.ssl_trainer as ssl_trainer
    import nnunet_logonet.training.trainer as trainer_module

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    trainer_class = getattr(trainer_module, name, None) or getattr(ssl_trainer, name)
    budget = trainer_module.DEMO_QUICK_BUDGET if name.endswith("Quick") else trainer_module.DEMO_BUDGET
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False}
    trainer = trainer_class(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}},
                            torch.device("cpu"))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (budget["epochs"], budget["iterations"])
    assert trainer.save_every == 1


def _preprocessed_case(folder, stored_shape, spacing=(1.0, 1.0, 1.0), cropped=(20, 30, 30)):
    """One case in nnU-Net's numpy layout: data as stored, and the properties its preprocessing kept."""
    import pickle

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "case_000.npz", data=np.zeros((1, *stored_shape), np.float32),
                        seg=np.zeros((1, *stored_shape), np.int8))
    with open(folder / "case_000.pkl", "wb") as f:
        pickle.dump({"spacing": list(spacing), "shape_after_cropping_and_before_resampling": cropped}, f)


def test_data_another_plans_wrote_into_the_shared_folder_is_refused_before_training(tmp_path, monkeypatch):
    """nnUNetv2_move_plans_between_datasets keeps LoGoNet's shared folder name nnUNetPlans_3d_fullres when the
    plans keep theirs; preprocessing them replaced the target's nnU-Net data, and either trainer then
    trained on the other plans' spacing without a word."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False, "transpose_forward": [0, 1, 2]}
    plans["configurations"]["3d_fullres"].update(data_identifier="nnUNetPlans_3d_fullres", spacing=[1.0, 1.0, 1.0])
    data = tmp_path / "pre" / DATASET / "nnUNetPlans_3d_fullres"
    _preprocessed_case(data, (10, 24, 24))  # resampled to 2 x 1.25 x 1.25 mm by other plans
    trainer = LoGoNetTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1},
                                                      "channel_names": {"0": "CT"}}, torch.device("cpu"))
    with pytest.raises(PlansMismatchError) as error:
        trainer.initialize()
    message = str(error.value)
    assert "case_000 holds data of shape [10, 24, 24]" in message and "resample this case to [20, 30, 30]" in message
    assert "-tp LoGoNetTinyPlans_fromSOURCE" in message and "logonet_plan_and_preprocess -d" in message
    assert not trainer.was_initialized
    _preprocessed_case(data, (20, 30, 30))  # what these plans' spacing gives: accepted
    trainer.check_preprocessed_data()


@pytest.mark.parametrize("layout", ["npz", "b2nd"])
def test_cases_of_the_fold_without_whole_preprocessed_data_are_named_before_training(tmp_path, monkeypatch, layout):
    """A case deleted from (or never written to) the data folder: nnU-Net's loader stops in a worker with
    "background workers are no longer alive"; refused first, naming the cases, their missing files and both fixes."""
    import json
    import shutil

    from nnunet_logonet.training.trainer import MissingPreprocessedDataError

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "transpose_forward": [0, 1, 2]}
    plans["configurations"]["3d_fullres"].update(data_identifier="nnUNetPlans_3d_fullres", spacing=[1.0, 1.0, 1.0])
    data = tmp_path / "pre" / DATASET / "nnUNetPlans_3d_fullres"
    _preprocessed_case(data, (20, 30, 30))
    whole = {"npz": ("case_000.npz", "case_000.pkl"), "b2nd": ("case_000.b2nd", "case_000_seg.b2nd", "case_000.pkl")}
    if layout == "b2nd":  # the files' names are all the check reads
        (data / "case_000.npz").rename(data / "case_000.b2nd")
        (data / "case_000_seg.b2nd").write_bytes(b"")
    for case in ("case_001", "case_002", "case_003"):
        for name in whole[layout]:
            shutil.copyfile(data / name, data / name.replace("case_000", case))
    (data / "case_001.pkl").unlink()
    (data / f"case_002.{layout}").unlink()
    splits = [{"train": ["case_000", "case_001"], "val": ["case_002"]}, {"train": ["case_002"], "val": ["case_003"]},
              {"train": ["case_000", "case_003"], "val": []}]
    (tmp_path / "pre" / DATASET / "splits_final.json").write_text(json.dumps(splits))
    dataset_json = {"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    (tmp_path / "pre" / DATASET / "gt_segmentations").mkdir()
    for case in ("case_000", "case_001", "case_002", "case_003"):  # the label copies validation reads
        (tmp_path / "pre" / DATASET / "gt_segmentations" / f"{case}.nii.gz").write_bytes(b"")

    def trainer(fold):
        return LoGoNetTrainer({**plans, "continue_training": False}, "3d_fullres", fold, dataset_json,
                              torch.device("cpu"))

    with pytest.raises(MissingPreprocessedDataError) as error:
        trainer(0).check_fold_cases_are_preprocessed()
    message = str(error.value)
    assert message.startswith(f"2 of the 3 cases of fold 0 ({tmp_path / 'pre' / DATASET / 'splits_final.json'}) "
                              f"are not whole in {data}: case_001 (no case_001.pkl), case_002 (no case_002.{layout})")
    # the ID, which both commands' -d takes, and the planner nnU-Net recorded in the plans (a placeholder here)
    assert "logonet_plan_and_preprocess -d 910 -pl <planner of LoGoNetTinyPlans>" in message
    assert "nnUNetv2_preprocess -d 910 -plans_name LoGoNetTinyPlans" in message
    assert "delete" in message and "splits_final.json so that nnU-Net makes new splits" in message
    # the whole data check runs it (the spacing check beside it reads the first case: real data in npz only)
    check = "check_preprocessed_data" if layout == "npz" else "check_fold_cases_are_preprocessed"
    with pytest.raises(MissingPreprocessedDataError, match="1 of the 2 cases of fold 1"):
        getattr(trainer(1), check)()
    getattr(trainer(2), check)()  # its cases are whole
    trainer("all").check_fold_cases_are_preprocessed()  # no split: check_every_case_is_preprocessed's part
    getattr(trainer(3), check)()  # no such fold in the file: nnU-Net makes one from the folder
    (tmp_path / "pre" / DATASET / "gt_segmentations" / "case_003.nii.gz").unlink()  # fold 1's validation case
    with pytest.raises(MissingPreprocessedDataError, match="2 of the 2 cases of fold 1 .* case_003 \\(no .*"
                                                            "gt_segmentations/case_003.nii.gz\\)"):
        getattr(trainer(1), check)()


def test_a_preprocessing_cut_short_is_refused_before_nnunet_splits_the_cases_that_are_there(tmp_path, monkeypatch):
    """Two preprocessings of one dataset at the same time left 6 of 10 cases; nnU-Net then split those 6 into its
    folds and kept that split in splits_final.json, the other 4 in no fold even after preprocessing again. Plans
    planned with --no_pp gave a bare FileNotFoundError. Both refused first, naming the cases and the fix."""
    import json
    import shutil

    from nnunet_logonet.training.trainer import MissingPreprocessedDataError

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    raw = tmp_path / "raw" / DATASET
    dataset_json = {"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                    "numTraining": 4}
    for sub_folder in ("imagesTr", "labelsTr"):
        (raw / sub_folder).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    cases = [f"case_{i:03d}" for i in range(4)]
    for case in cases:
        (raw / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"")
        (raw / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "transpose_forward": [0, 1, 2]}
    plans["configurations"]["3d_fullres"].update(data_identifier="nnUNetPlans_3d_fullres", spacing=[1.0, 1.0, 1.0])
    pre = tmp_path / "pre" / DATASET
    data, gt, splits_file = pre / "nnUNetPlans_3d_fullres", pre / "gt_segmentations", pre / "splits_final.json"

    def trainer(fold):
        return LoGoNetTrainer({**plans, "continue_training": False}, "3d_fullres", fold, dataset_json,
                              torch.device("cpu"))

    pre.mkdir(parents=True)
    with pytest.raises(MissingPreprocessedDataError) as error:  # planned with --no_pp
        trainer(0).check_preprocessed_data()
    assert str(error.value).startswith(f"{data} does not exist: plans LoGoNetTinyPlans were planned but never "
                                       f"preprocessed for 3d_fullres")
    assert "nnUNetv2_preprocess -d 910 -plans_name LoGoNetTinyPlans -c 3d_fullres" in str(error.value)

    _preprocessed_case(data, (20, 30, 30))
    shutil.copyfile(data / "case_000.npz", data / "case_001.npz")
    shutil.copyfile(data / "case_000.pkl", data / "case_001.pkl")
    with pytest.raises(MissingPreprocessedDataError) as error:  # 2 of 4 cases, no label copies yet
        trainer(0).check_preprocessed_data()
    message = str(error.value)
    assert message.startswith(f"4 of the 4 cases of {raw} are not whole in the preprocessed data: case_000 (no "
                              f"{gt / 'case_000.nii.gz'}), case_001 (no {gt / 'case_001.nii.gz'}), case_002 (no "
                              f"{data / 'case_002.npz'}), case_003 (no {data / 'case_003.npz'})")
    assert f"keep that split in {splits_file}, leaving the others out of every fold for good" in message
    assert "logonet_plan_and_preprocess -d 910" in message and not splits_file.exists()
    with pytest.raises(MissingPreprocessedDataError, match="fold all would train on the cases that are there alone"):
        trainer("all").check_preprocessed_data()

    for case in cases[2:]:
        shutil.copyfile(data / "case_000.npz", data / f"{case}.npz")
        shutil.copyfile(data / "case_000.pkl", data / f"{case}.pkl")
    gt.mkdir()
    for case in cases:
        (gt / f"{case}.nii.gz").write_bytes(b"")
    trainer(0).check_preprocessed_data()  # every case whole, every label copied
    trainer("all").check_preprocessed_data()

    monkeypatch.delenv("nnUNet_raw")  # only the preprocessed data: its label copies count
    (data / "case_003.npz").unlink()
    with pytest.raises(MissingPreprocessedDataError, match=f"1 of the 4 cases of {gt} are not whole"):
        trainer(0).check_preprocessed_data()
    shutil.copyfile(data / "case_000.npz", data / "case_003.npz")

    splits_file.write_text(json.dumps([{"train": ["case_000"], "val": ["case_001"]}] * 5))  # a split of 2 cases
    logged = []
    with_split = trainer(0)
    monkeypatch.setattr(with_split, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(args)))
    with_split.check_preprocessed_data()  # a split may leave cases out on purpose: logged, not refused
    assert logged == [f"WARNING: {splits_file} puts 2 of the 4 cases in {data} in no fold: case_002, case_003. If "
                      f"that split was made while the data were incomplete (a preprocessing cut short), delete it "
                      f"before training any fold, so that nnU-Net splits every case."]


def test_a_cascade_stage_without_the_first_stages_segmentations_names_the_folds_to_train(tmp_path, monkeypatch):
    """3d_cascade_fullres after 3d_lowres trained on fold 0 only: nnU-Net's loader died in a worker on the first
    case without a previous-stage segmentation; refused first, naming the cases and the trainings to run."""
    import json
    import shutil

    from nnunet_logonet.training.trainer import MissingPreprocessedDataError

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    plans = {**_plans(**{"3d_lowres": [12, 32, 32], "3d_cascade_fullres": [12, 32, 32]}),
             "transpose_forward": [0, 1, 2]}
    plans["configurations"]["3d_lowres"].update(next_stage="3d_cascade_fullres", spacing=[2.0, 2.0, 2.0])
    plans["configurations"]["3d_cascade_fullres"].update(previous_stage="3d_lowres", spacing=[1.0, 1.0, 1.0],
                                                         data_identifier="nnUNetPlans_3d_fullres")
    data = tmp_path / "pre" / DATASET / "nnUNetPlans_3d_fullres"
    _preprocessed_case(data, (20, 30, 30))
    shutil.copyfile(data / "case_000.npz", data / "case_001.npz")
    shutil.copyfile(data / "case_000.pkl", data / "case_001.pkl")
    (tmp_path / "pre" / DATASET / "splits_final.json").write_text(json.dumps([{"train": ["case_000"],
                                                                                "val": ["case_001"]}]))
    previous = (tmp_path / "results" / DATASET / "LoGoNetTrainer__LoGoNetTinyPlans__3d_lowres" / "predicted_next_stage"
                / "3d_cascade_fullres")
    previous.mkdir(parents=True)
    (previous / "case_001.npz").write_bytes(b"")  # fold 0's validation predicted its own case only
    (tmp_path / "pre" / DATASET / "gt_segmentations").mkdir()
    (tmp_path / "pre" / DATASET / "gt_segmentations" / "case_001.nii.gz").write_bytes(b"")
    trainer = LoGoNetTrainer({**plans, "continue_training": False}, "3d_cascade_fullres", 0,
                             {"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"},
                              "file_ending": ".nii.gz"}, torch.device("cpu"))
    with pytest.raises(MissingPreprocessedDataError) as error:
        trainer.check_preprocessed_data()
    message = str(error.value)
    assert message.startswith(f"1 of the 2 cases of fold 0 have no 3d_lowres segmentation in {previous}: case_000.")
    assert f"nnUNetv2_train 910 3d_lowres FOLD -tr LoGoNetTrainer -p LoGoNetTinyPlans, FOLD 0..4" in message
    (previous / "case_000.npz").write_bytes(b"")
    trainer.check_preprocessed_data()


def test_data_check_follows_nnunets_transpose_and_inheritance(tmp_path):
    from nnunet_logonet.planning.data_check import data_spacing_mismatch

    plans = {"plans_name": "P", "transpose_forward": [2, 0, 1], "configurations": {
        "3d_fullres": {"spacing": [1.0, 1.0, 2.0]}, "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    # raw spacing (1, 1, 2) in the file's axis order -> (2, 1, 1) after the transpose; cropped (10, 20, 20)
    _preprocessed_case(tmp_path / "d", (20, 20, 10), spacing=(1.0, 1.0, 2.0), cropped=(10, 20, 20))
    assert data_spacing_mismatch(tmp_path / "d", plans, "3d_cascade_fullres") is None
    plans["configurations"]["3d_fullres"]["spacing"] = [1.0, 1.0, 1.0]
    assert "resample this case to [20, 20, 20]" in data_spacing_mismatch(tmp_path / "d", plans, "3d_cascade_fullres")
    assert data_spacing_mismatch(tmp_path / "missing", plans, "3d_fullres") is None
    (tmp_path / "empty").mkdir()
    assert data_spacing_mismatch(tmp_path / "empty", plans, "3d_fullres") is None


def test_compile_is_off_by_default_and_follows_nnunets_rules_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False}
    trainer = LoGoNetTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1},
                                                      "channel_names": {"0": "CT"}}, torch.device("cpu"))
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(map(str, args))))
    monkeypatch.setenv("nnUNet_compile", "t")
    assert trainer._do_i_compile() is False
    assert any("disabled because device is CPU" in line for line in logged)  # nnU-Net's own message
    trainer.device = torch.device("cuda")  # the decision only reads the device type
    assert trainer._do_i_compile() is True
    monkeypatch.delenv("nnUNet_compile")
    assert trainer._do_i_compile() is False
    assert any("off for LoGoNet by default" in line for line in logged)


@pytest.mark.parametrize("trainer", [LoGoNetTrainer, LoGoNetTrainer_demoQuick, ULKANetTrainer])
def test_a_pretraining_dataset_is_refused_by_the_supervised_trainers_only(tmp_path, monkeypatch, trainer):
    """An image-only dataset's labels are placeholder body masks: one wrong dataset ID would train a body outliner.
    Refused before nnU-Net writes anything, naming the file and both fixes; the SSL trainer takes it."""
    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainerCPU
    from nnunet_logonet.training.trainer import ImageOnlyDatasetError

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False}
    if trainer is ULKANetTrainer:
        ulka = plans["configurations"]["3d_fullres"]["architecture"]
        ulka["network_class_name"] = "nnunet_logonet.network.ulkanet.ULKANet"
        for key in ("local_grid", "local_stages"):
            ulka["arch_kwargs"].pop(key)
    image_only = {"labels": {"background": 0, "body": 1}, "logonet_image_only": True}
    with pytest.raises(ImageOnlyDatasetError, match=rf"(?s){DATASET} is an image-only dataset.*"
                                                    rf"\$nnUNet_preprocessed/{DATASET}/dataset.json says "
                                                    rf"\"logonet_image_only\": true.*{trainer.__name__} would learn.*"
                                                    rf"labeled dataset's ID.*-tr LoGoNetSSLTrainer"):
        trainer(plans, "3d_fullres", 0, image_only, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []
    trainer({**plans, "continue_training": False}, "3d_fullres", 0, {**image_only, "logonet_image_only": False},
            torch.device("cpu"))
    if trainer is LoGoNetTrainer:
        LoGoNetSSLTrainerCPU({**plans, "continue_training": False}, "3d_fullres", 0, image_only, torch.device("cpu"))


def test_a_label_value_dataset_json_lacks_is_named_with_its_file_when_the_loss_stops(tmp_path, monkeypatch):
    """Without --verify_dataset_integrity nnU-Net preprocesses a stray label value (a 255 of an annotation tool,
    a label missing from dataset.json) as it is, and training stops at the loss's one-hot encoding with PyTorch's
    "index 9 is out of bounds for dimension 1 with size 2", naming no file. The trainer names the raw label files,
    their values, the declared labels and the fix; other errors pass unchanged."""
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_logonet.training.trainer import UndeclaredLabelError

    for variable in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    plans = {**_plans(**{"3d_fullres": [12, 32, 32]}), "continue_training": False, "transpose_forward": [0, 1, 2]}
    plans["configurations"]["3d_fullres"].update(data_identifier="nnUNetPlans_3d_fullres", spacing=[1.0, 1.0, 1.0])
    data = tmp_path / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    _preprocessed_case(data, (20, 30, 30))
    seg = np.zeros((1, 20, 30, 30), np.int16)
    seg[0, 0, 0, :2] = -1, 1  # nnU-Net's mark outside the nonzero crop, and a declared label: both fine
    seg[0, 1, 0, :3] = 9, 255, 9
    np.savez_compressed(data / "case_001.npz", data=np.zeros((1, 20, 30, 30), np.float32), seg=seg)
    (data / "case_001.pkl").write_bytes((data / "case_000.pkl").read_bytes())
    dataset_json = {"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    plans["experiment_planner_used"] = "LoGoNetTinyPlanner"  # nnU-Net records it; the fix names it
    trainer = LoGoNetTrainer(plans, "3d_fullres", "all", dataset_json, torch.device("cpu"))

    def one_hot_stops(self, batch):
        raise RuntimeError("index 9 is out of bounds for dimension 1 with size 2")

    for step in ("train_step", "validation_step"):
        monkeypatch.setattr(nnUNetTrainer, step, one_hot_stops)
        with pytest.raises(UndeclaredLabelError) as error:
            getattr(trainer, step)({})
        message = str(error.value)
        raw_label = tmp_path / "nnUNet_raw" / DATASET / "labelsTr" / "case_001.nii.gz"
        assert f"1 label file(s) hold values dataset.json does not declare: {raw_label} (values [9, 255])" in message
        assert "case_000" not in message and "declares background=0, a=1, so the network has 2 outputs" in message
        assert "logonet_plan_and_preprocess -d 910 -pl LoGoNetTinyPlanner --clean --verify_dataset_integrity" in message
        assert "index 9 is out of bounds" in message
        assert isinstance(error.value.__cause__, RuntimeError)

    def device_assert(self, batch):  # CUDA's words for the same stop: no value, no size
        raise RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously ...")

    monkeypatch.setattr(nnUNetTrainer, "train_step", device_assert)
    with pytest.raises(UndeclaredLabelError) as error:
        trainer.train_step({})
    assert f"{raw_label} (values [9, 255])" in str(error.value) and "has 2 outputs" in str(error.value)

    def out_of_memory(self, batch):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(nnUNetTrainer, "train_step", out_of_memory)
    with pytest.raises(RuntimeError, match="not enough memory") as error:
        trainer.train_step({})
    assert type(error.value) is RuntimeError
    (data / "case_001.npz").unlink()  # every label declared: a device-side assert of something else passes unchanged
    (data / "case_001.pkl").unlink()
    monkeypatch.setattr(nnUNetTrainer, "train_step", device_assert)
    with pytest.raises(RuntimeError, match="device-side assert") as error:
        trainer.train_step({})
    assert type(error.value) is RuntimeError
