"""prepare_pretraining_dataset's checks and its skip / redo decisions, with nnU-Net's commands stubbed.

Every nnU-Net command the pipeline resolves (``_command``) is replaced by a tiny script that records its
argv and writes what the real command would leave behind (fingerprint, moved plans, preprocessed cases),
so a rerun's decisions can be checked in seconds; no real nnU-Net command runs here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_logonet.ssl import pipeline
from nnunet_logonet.ssl.pipeline import PipelineError, main, prepare_pretraining_dataset

PLANS = "LoGoNetTinyPlans"
SOURCE, TARGET = 910, 911
SOURCE_PLANS = {"dataset_name": "Dataset910_X", "plans_name": PLANS, "image_reader_writer": "SimpleITKIO",
                "configurations": {"3d_fullres": {"patch_size": [4, 8, 8],
                                                  "data_identifier": "nnUNetPlans_3d_fullres"}}}

FAKE_COMMAND = '''#!{python}
import json, os, sys
from pathlib import Path

name, args = Path(sys.argv[0]).name, sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(" ".join([name, *args]) + "\\n")
if os.environ.get("FAKE_FAIL") == name:
    for i in range(30):
        print(f"line {{i}}")
    print("boom")
    sys.exit(3)
raw, pre = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
def folder(root, flag):
    return next(root.glob(f"Dataset{{int(args[args.index(flag) + 1]):03d}}_*"))
if name == "nnUNetv2_extract_fingerprint":
    target = pre / folder(raw, "-d").name
    target.mkdir(parents=True, exist_ok=True)
    (target / "dataset_fingerprint.json").write_text("{{}}")
elif name == "nnUNetv2_move_plans_between_datasets":
    plans = json.loads((folder(pre, "-s") / (args[args.index("-sp") + 1] + ".json")).read_text())
    target = pre / folder(raw, "-t").name
    plans["dataset_name"] = target.name
    (target / (args[args.index("-tp") + 1] + ".json")).write_text(json.dumps(plans))
elif name == "nnUNetv2_preprocess":
    target = pre / folder(raw, "-d").name
    plans = json.loads((target / (args[args.index("-plans_name") + 1] + ".json")).read_text())
    data = target / plans["configurations"][args[args.index("-c") + 1]]["data_identifier"]
    data.mkdir(exist_ok=True)
    for scan in (raw / target.name / "imagesTr").glob("*_0000.nii.gz"):
        case = scan.name[: -len("_0000.nii.gz")]
        (data / (case + ".pkl")).write_bytes(b"x")
        (data / (case + ".npz")).write_bytes(b"x")
'''


@pytest.fixture
def fake_nnunet(tmp_path, monkeypatch):
    """nnU-Net's commands replaced by FAKE_COMMAND scripts; returns the file their calls are recorded in."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    for name in ("nnUNetv2_extract_fingerprint", "nnUNetv2_move_plans_between_datasets", "nnUNetv2_preprocess"):
        script = bin_dir / name
        script.write_text(FAKE_COMMAND.format(python=sys.executable))
        script.chmod(0o755)
    monkeypatch.setattr(pipeline, "_command", lambda name, env: str(bin_dir / name))
    return tmp_path / "calls.txt"


def make_source(tmp_path: Path, meta: dict | None = None) -> dict[str, str]:
    """A labeled source (two 1-channel scans, its dataset.json and plans); returns the pipeline's env."""
    source = tmp_path / "raw" / "Dataset910_X"
    (source / "imagesTr").mkdir(parents=True)
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 8, 8), 100.0, np.float32)),
                        str(source / "imagesTr" / f"{case}_0000.nii.gz"))
    meta = {"channel_names": {"0": "CT"}} if meta is None else meta
    (source / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "a": 1}, "numTraining": 2,
                                                     "file_ending": ".nii.gz"}))
    (tmp_path / "pre" / "Dataset910_X").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text(json.dumps(SOURCE_PLANS))
    return {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
            "FAKE_CALLS": str(tmp_path / "calls.txt")}


def run(env: dict[str, str]) -> dict:
    return prepare_pretraining_dataset(SOURCE, TARGET, PLANS, env=env, log=[].append)


def test_first_run_does_every_step_and_a_rerun_skips_them(tmp_path, fake_nnunet):
    """The stub behaves as nnU-Net does: one call does all steps, the next finds them done."""
    env = make_source(tmp_path)
    said: list[str] = []
    first = prepare_pretraining_dataset(SOURCE, TARGET, PLANS, env=env, log=said.append)
    assert first["ran"] == ["prepare_unlabeled", "extract_fingerprint", "move_plans", "copy_dataset_json",
                            "preprocess"]
    # every step's line, the commands run included, carries its number; commands by name, as a user types them
    assert [line.split(" ")[:2] for line in said if line.startswith("[")] == [
        ["[1/5]", "logonet_prepare_unlabeled"], ["[2/5]", "nnUNetv2_extract_fingerprint"],
        ["[3/5]", "nnUNetv2_move_plans_between_datasets"], ["[4/5]", "cp"], ["[5/5]", "nnUNetv2_preprocess"]]
    assert first["num_cases"] == 2 and first["dataset"] == "Dataset911_Pretraining"
    second = run(env)
    assert second["ran"] == [] and len(second["skipped"]) == 5


def test_a_rerun_with_other_image_folders_makes_the_dataset_again(tmp_path, fake_nnunet):
    """New scans given by -i on a rerun are pre-trained on, not skipped because the dataset exists; the steps
    after it are redone with them."""
    env = make_source(tmp_path)
    said: list[str] = []
    run(env)
    extra = tmp_path / "extra"
    extra.mkdir()
    for case in ("c", "d"):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 8, 8), 50.0, np.float32)), str(extra / f"{case}.nii.gz"))
    again = prepare_pretraining_dataset(SOURCE, TARGET, PLANS, extra_image_folders=[extra], env=env, log=said.append)
    assert again["ran"][0] == "prepare_unlabeled" and "preprocess" in again["ran"] and again["num_cases"] == 4
    assert any("holds other cases than the image folders give now: 2 new (c, d): made again" in s for s in said)
    images = tmp_path / "raw" / "Dataset911_Pretraining" / "imagesTr"
    assert sorted(p.name for p in images.iterdir()) == [f"{c}_0000.nii.gz" for c in "abcd"]
    data = tmp_path / "pre" / "Dataset911_Pretraining" / "nnUNetPlans_3d_fullres"
    assert sorted(p.stem for p in data.glob("*.pkl")) == ["a", "b", "c", "d"]
    # and back: cases no longer given are dropped; the same folders again skip it
    said.clear()
    assert prepare_pretraining_dataset(SOURCE, TARGET, PLANS, env=env, log=said.append)["ran"][0] == "prepare_unlabeled"
    assert any("2 no longer given (c, d)" in s for s in said)
    assert sorted(p.name for p in images.iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert "prepare_unlabeled" in run(env)["skipped"]


def test_the_sources_own_folder_given_with_i_is_read_once(tmp_path, fake_nnunet):
    """-i $nnUNet_raw/DatasetS/imagesTr beside the source's images, which the pipeline adds itself: every case
    was a "duplicate case name" with the advice to rename one; now read once, with a note."""
    env = make_source(tmp_path)
    said: list[str] = []
    given = tmp_path / "raw" / "Dataset910_X" / "." / "imagesTr"  # another spelling of the same folder
    result = prepare_pretraining_dataset(SOURCE, TARGET, PLANS, extra_image_folders=[given], env=env,
                                         log=said.append)
    assert result["num_cases"] == 2
    assert any(s.startswith(f"note: {given} is already among the image folders") for s in said)


def test_changed_source_plans_are_moved_and_preprocessed_again(tmp_path, fake_nnunet):
    """Source re-planned (other patch size): the target must get the new plans and be preprocessed with them."""
    env = make_source(tmp_path)
    run(env)
    changed = {**SOURCE_PLANS, "configurations": {"3d_fullres": {**SOURCE_PLANS["configurations"]["3d_fullres"],
                                                                 "patch_size": [4, 8, 16]}}}
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text(json.dumps(changed))
    again = run(env)
    assert "move_plans" in again["ran"] and "preprocess" in again["ran"]
    moved = json.loads((tmp_path / "pre" / "Dataset911_Pretraining" / f"{PLANS}.json").read_text())
    assert moved["configurations"]["3d_fullres"]["patch_size"] == [4, 8, 16]


def test_stale_preprocessed_dataset_json_is_replaced_by_the_raw_one(tmp_path, fake_nnunet):
    """nnUNetv2_train reads dataset.json from nnUNet_preprocessed: a different copy there must be replaced."""
    env = make_source(tmp_path)
    run(env)
    copy = tmp_path / "pre" / "Dataset911_Pretraining" / "dataset.json"
    copy.write_text(json.dumps({"channel_names": {"0": "MR"}}))
    again = run(env)
    assert "copy_dataset_json" in again["ran"]
    assert copy.read_bytes() == (tmp_path / "raw" / "Dataset911_Pretraining" / "dataset.json").read_bytes()


def test_preprocessed_cases_of_other_names_are_preprocessed_again(tmp_path, fake_nnunet):
    """Preprocessed files that are not the raw dataset's cases must not count as done."""
    env = make_source(tmp_path)
    first = run(env)
    data = Path(first["preprocessed_folder"])
    for old in data.iterdir():
        old.unlink()
    for case in ("x", "y"):
        (data / f"{case}.pkl").write_bytes(b"x")
        (data / f"{case}.npz").write_bytes(b"x")
    again = run(env)
    assert again["ran"] == ["preprocess"]
    assert {"a", "b"} <= {p.stem for p in data.glob("*.pkl")}


def test_failing_command_reports_exit_code_and_the_end_of_its_output(tmp_path, fake_nnunet):
    """A failing nnU-Net command's error must show why it failed (its last output lines), not only its code."""
    env = {**make_source(tmp_path), "FAKE_FAIL": "nnUNetv2_extract_fingerprint"}
    with pytest.raises(PipelineError, match="nnUNetv2_extract_fingerprint failed with exit code 3") as error:
        run(env)
    message = str(error.value)
    assert message.rstrip().endswith("boom") and "line 29" in message and "line 10" not in message


def test_source_channel_names_must_start_at_zero(tmp_path, fake_nnunet):
    """channel_names {"1": "CT"} is not a valid nnU-Net dataset.json: refused before anything is written."""
    env = make_source(tmp_path, {"channel_names": {"1": "CT"}})
    with pytest.raises(PipelineError, match="has no valid channel_names"):
        run(env)
    assert not (tmp_path / "raw" / "Dataset911_Pretraining").exists()
    assert not fake_nnunet.exists()


def test_legacy_modality_key_gives_the_channel_names(tmp_path, fake_nnunet):
    """Older (nnU-Net v1 style) sources name channels under "modality": the target gets those names."""
    env = make_source(tmp_path, {"modality": {"0": "CT"}})
    run(env)
    meta = json.loads((tmp_path / "raw" / "Dataset911_Pretraining" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}


@pytest.mark.parametrize("value", [0, True, "2"])
def test_num_processes_must_be_a_positive_int(tmp_path, value):
    """-np 0 (or a bool / str) would reach nnU-Net as a bad process count: refused up front."""
    with pytest.raises(ValueError, match=r"num_processes must be an int >= 1"):
        prepare_pretraining_dataset(SOURCE, TARGET, PLANS, num_processes=value, env={}, log=[].append)


def test_labeled_dataset_with_the_target_id_is_not_used(tmp_path, fake_nnunet):
    """A labeled dataset already holding the target ID must not be preprocessed over with other plans."""
    env = make_source(tmp_path)
    other = tmp_path / "raw" / "Dataset911_X"
    (other / "imagesTr").mkdir(parents=True)
    (other / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    with pytest.raises(PipelineError, match="not an image-only dataset"):
        run(env)
    assert not fake_nnunet.exists()


def test_cli_reports_errors_with_exit_code_2(capsys):
    """Scripts chaining the command rely on a non-zero exit and a one-line "error:" message."""
    assert main(["-s", "910", "-t", "910"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_names_the_pretraining_command_for_a_gpu_and_for_a_cpu(tmp_path, fake_nnunet, monkeypatch, capsys):
    """The paper's LoGoNetSSLTrainer fits 80 clusterers up to k 500, far too slow on a CPU: the CPU command too."""
    for key, value in make_source(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert main(["-s", "910", "-t", "911", "-p", PLANS]) == 0
    printed = capsys.readouterr().out
    assert f"nnUNetv2_train 911 3d_fullres all -tr LoGoNetSSLTrainer -p {PLANS}\n" in printed
    assert f"nnUNetv2_train 911 3d_fullres all -tr LoGoNetSSLTrainerCPU -p {PLANS} -device cpu" in printed
