"""End to end through nnU-Net's own commands, as a user types them: CI's real pass.

logonet_env -> logonet_phantom -> logonet_plan_and_preprocess -> nnUNetv2_train (killed after a
checkpoint, continued with --c) -> nnUNetv2_predict -> nnUNetv2_evaluate_folder, then model export
and re-import. One short training (4 epochs x 10 iterations) serves every check: this module is
about the workflow, so it runs in every CI run (~2.5 min on 2 cores). Whether that training
segments anything is tests/test_e2e_learning.py's question (750 iterations, marked slow).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TEST_TRAINERS = Path(__file__).parent / "ext_trainers"
DATASET = "Dataset900_Phantom"
TRAINER = "LoGoNetTrainer_ciE2E"  # 4 epochs x 10 iterations, a checkpoint every epoch
EPOCHS = 4
PLANS = "LoGoNetTinyPlans"


def run(cmd: list[str], env: dict, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def user_environment(base: Path) -> dict:
    """What ``eval "$(logonet_env)"`` gives a user's shell, plus nnU-Net's CPU settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    out = run([str(BIN / "logonet_env"), "--base", str(base), "--mkdir"], env).stdout
    for line in out.splitlines():
        name, value = line.removeprefix("export ").split("=", 1)
        env[name] = shlex.split(value)[0]
    env["nnUNet_extTrainer"] = f"{env['nnUNet_extTrainer']}{os.pathsep}{TEST_TRAINERS}"
    env["nnUNet_n_proc_DA"] = "1"
    env["nnUNet_def_n_proc"] = "1"  # export/evaluation workers (nnU-Net's default: 8 spawned processes)
    env["nnUNet_compile"] = "f"
    return env


def write_and_plan_phantom(env: dict) -> subprocess.CompletedProcess:
    """Dataset900_Phantom (10 training, 2 held-out cases at 32 voxels), planned for LoGoNet-tiny with the
    README's command (no -c: nnU-Net's default 3d_fullres and 3d_lowres, of which the phantom gets only the
    first)."""
    run(["logonet_phantom", "-d", "900", "--num-train", "10", "--num-test", "2", "--num-unlabeled", "0",
         "--size", "32", "--seed", "0", "-q"], env)
    return run(["logonet_plan_and_preprocess", "-d", "900", "-pl", "LoGoNetTinyPlanner", "-np", "1", "-npfp", "1",
                "--verify_dataset_integrity"], env)


def predict_and_evaluate(env: dict, trainer: str, pred: Path) -> dict:
    """nnUNetv2_predict (fold 0) on the held-out images, nnUNetv2_evaluate_folder against their labels:
    nnU-Net's summary.json, also left in ``pred``."""
    raw = Path(env["nnUNet_raw"]) / DATASET
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "900", "-c", "3d_fullres",
         "-f", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    preprocessed = Path(env["nnUNet_preprocessed"]) / DATASET
    run(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile", str(preprocessed / "dataset.json"),
         "-pfile", str(preprocessed / f"{PLANS}.json"), "-np", "1"], env)
    return json.loads((pred / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    env = user_environment(base)
    raw = Path(env["nnUNet_raw"]) / DATASET
    results = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"

    planned = write_and_plan_phantom(env)

    train = ["nnUNetv2_train", "900", "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"]
    # start, wait for the first checkpoint, kill hard (as a crash or a lost job would)
    proc = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    latest = results / "checkpoint_latest.pth"
    deadline = time.time() + 900
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert latest.is_file(), f"no checkpoint before the run ended: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at_epoch = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
    logs_before = set(results.glob("training_log_*.txt"))
    time.sleep(1.1)  # nnU-Net names logs by the second

    run(train + ["--c", "--npz"], env)  # its final validation exports the softmax probabilities too
    resumed_logs = sorted(set(results.glob("training_log_*.txt")) - logs_before)

    pred = base / "pred"
    predict_and_evaluate(env, TRAINER, pred)
    preprocessed = Path(env["nnUNet_preprocessed"]) / DATASET
    return {"env": env, "base": base, "raw": raw, "results": results, "pred": pred, "preprocessed": preprocessed,
            "killed_at_epoch": killed_at_epoch, "resumed_logs": resumed_logs, "planned": planned}


def test_plans_name_logonet_and_a_valid_patch(trained):
    from nnunet_logonet.network import check_patch_size

    plans = json.loads((trained["preprocessed"] / f"{PLANS}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["architecture"]["network_class_name"] == "nnunet_logonet.network.logonet.LoGoNet"
    kwargs = config["architecture"]["arch_kwargs"]
    check_patch_size(config["patch_size"], kwargs["strides"], kwargs["local_grid"], kwargs["local_stages"])
    assert "2d" not in plans["configurations"]


def test_the_reports_cost_counts_describe_the_trained_network(trained):
    """The demo report's parameters and MACs come from the plans as nnU-Net builds the network: the
    parameter count is the trained checkpoint's, the MACs fvcore's for one patch."""
    import torch

    from nnunet_logonet.demo.costs import network_costs

    costs = network_costs(trained["preprocessed"] / f"{PLANS}.json", trained["raw"] / "dataset.json")
    weights = torch.load(trained["results"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    buffers = {"running_mean", "running_var", "num_batches_tracked"}
    trained_params = sum(v.numel() for k, v in weights["network_weights"].items() if k.rsplit(".", 1)[-1] not in buffers)
    plans = json.loads((trained["preprocessed"] / f"{PLANS}.json").read_text())
    assert costs["parameters"] == trained_params
    assert costs["patch_size"] == plans["configurations"]["3d_fullres"]["patch_size"]
    assert costs["network"] == "nnunet_logonet.network.logonet.LoGoNet"
    assert costs["macs"] > 10 * costs["parameters"]
    # fvcore leaves elementwise ops uncounted (activations, adds), never a convolution or matrix product
    assert not [op for op in costs["fvcore_uncounted_ops"] if "conv" in op or "mm" in op or "matmul" in op]


def test_training_writes_nnunet_outputs(trained):
    results = trained["results"]
    assert (results / "checkpoint_final.pth").is_file()
    assert (results / "checkpoint_best.pth").is_file()
    assert (results / "progress.png").is_file()
    assert not list(results.glob("*.tmp*")), "a temporary checkpoint was left behind"
    summary = json.loads((results / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    assert list((results / "validation").glob("*.npz")), "--npz exported no probabilities"


def test_killed_training_continues_where_it_stopped(trained):
    final = torch.load(trained["results"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == EPOCHS
    assert 1 <= trained["killed_at_epoch"] < EPOCHS
    assert trained["resumed_logs"], "the --c run wrote no training log"
    log = trained["resumed_logs"][-1].read_text()
    epochs = [int(line.rsplit("Epoch ", 1)[1]) for line in log.splitlines() if line.rstrip().split(" ")[-2:-1] == ["Epoch"]]
    assert epochs and epochs[0] == trained["killed_at_epoch"], (epochs, trained["killed_at_epoch"])


def test_predictions_have_the_input_geometry(trained):
    images = sorted((trained["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    assert images
    for image_file in images:
        case = image_file.name.replace("_0000.nii.gz", ".nii.gz")
        image, pred = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(trained["pred"] / case))
        assert pred.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)


def test_loss_goes_down_over_the_killed_and_resumed_run(trained):
    """nnU-Net's Dice + CE falls by a third or more within 4 x 10 iterations on the phantom (1.6-2.5
    -> 0.55-0.9 after 3 x 10 in the quick demo's runs); the resumed run continues nnU-Net's log."""
    logging = torch.load(trained["results"] / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["logging"]
    train, val = logging["train_losses"], logging["val_losses"]
    assert len(train) == len(val) == EPOCHS, "the resumed run lost the epochs before the kill"
    assert train[-1] < 0.7 * train[0], train
    assert val[-1] < val[0], val


def test_evaluation_scores_every_organ_of_every_test_case(trained):
    labels = json.loads((trained["raw"] / "dataset.json").read_text())["labels"]
    summary = json.loads((trained["pred"] / "summary.json").read_text())
    organs = {str(v) for k, v in labels.items() if k != "background"}
    assert set(summary["mean"]) == organs
    assert len(summary["metric_per_case"]) == len(list((trained["raw"] / "imagesTs").glob("*_0000.nii.gz")))
    for scores in summary["mean"].values():
        assert 0.0 <= scores["Dice"] <= 1.0 or np.isnan(scores["Dice"])


def test_export_then_install_gives_the_same_predictions(trained, tmp_path):
    env = trained["env"]
    archive = tmp_path / "model.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", "900", "-o", str(archive), "-c", "3d_fullres", "-tr", TRAINER,
         "-p", PLANS, "-f", "0", "--not_strict"], env)
    other = dict(env, nnUNet_results=str(tmp_path / "other_results"))
    Path(other["nnUNet_results"]).mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], other)
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(trained["raw"] / "imagesTs"), "-o", str(pred), "-d", "900", "-c",
         "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1",
         "-nps", "1"], other)
    for original in sorted(trained["pred"].glob("*.nii.gz")):
        again = pred / original.name
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(original))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(again))))


# ------------------------------------------------------------------------------ bad input

def test_missing_ext_trainer_variable_names_it(trained):
    env = {k: v for k, v in trained["env"].items() if k != "nnUNet_extTrainer"}
    proc = run(["nnUNetv2_train", "900", "3d_fullres", "0", "-tr", "LoGoNetTrainer", "-p", PLANS, "-device", "cpu"],
               env, check=False, timeout=300)
    assert proc.returncode != 0
    assert "nnUNet_extTrainer" in proc.stdout + proc.stderr


def test_plans_of_another_network_stop_before_training(trained):
    env = trained["env"]
    run(["nnUNetv2_plan_experiment", "-d", "900"], env)  # nnU-Net's default plans (PlainConvUNet)
    proc = run(["nnUNetv2_train", "900", "3d_fullres", "1", "-tr", "LoGoNetTrainer", "-p", "nnUNetPlans",
                "-device", "cpu"], env, check=False, timeout=300)
    assert proc.returncode != 0
    assert "logonet_plan_and_preprocess -d 900 -pl LoGoNetPlanner" in proc.stderr
    assert not (Path(env["nnUNet_results"]) / DATASET / "LoGoNetTrainer__nnUNetPlans__3d_fullres").exists()


def test_unknown_plans_identifier_fails_before_training(trained):
    env = trained["env"]
    proc = run(["nnUNetv2_train", "900", "3d_fullres", "0", "-tr", "LoGoNetTrainer", "-p", "NoSuchPlans",
                "-device", "cpu"], env, check=False, timeout=300)
    assert proc.returncode != 0
    assert "NoSuchPlans" in proc.stderr
    assert not (Path(env["nnUNet_results"]) / DATASET / "LoGoNetTrainer__NoSuchPlans__3d_fullres").exists()


def test_mismatched_pretrained_weights_are_refused_listing_every_key(trained, tmp_path):
    """README: ``-pretrained_weights`` is checked first and refused with every missing, mismatched or unused
    key listed (nnU-Net's loader stops at the first missing key and drops unused ones silently)."""
    env = trained["env"]
    weights = torch.load(trained["results"] / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    # (nnU-Net never transfers the segmentation layers, so those may differ)
    convolutions = [k for k, w in weights.items() if k.endswith(".weight") and w.ndim == 5 and "seg_layers" not in k]
    missing, reshaped = convolutions[0], convolutions[-1]
    del weights[missing]
    weights[reshaped] = torch.zeros(*weights[reshaped].shape[:-1], weights[reshaped].shape[-1] + 1)
    weights["projection_head.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "pretrained_elsewhere.pth"
    torch.save({"network_weights": weights}, bad)
    fold = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_3"
    proc = run(["nnUNetv2_train", "900", "3d_fullres", "3", "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
                "-pretrained_weights", str(bad)], env, check=False, timeout=300)
    assert proc.returncode != 0
    for named in (bad.name, missing, reshaped, "projection_head.weight", "1 key(s) missing", "1 not in the network",
                  "1 shape mismatch(es)", "nnUNetv2_move_plans_between_datasets"):
        assert named in proc.stderr, (named, proc.stderr[-3000:])
    assert not list(fold.glob("checkpoint_*.pth"))  # refused before the first epoch


def test_plan_command_as_the_readme_gives_it_skips_the_lowres_stage_nnunet_did_not_plan(trained):
    """Without -c the command asks for nnU-Net's default 3d_fullres and 3d_lowres; a dataset too small for a
    low-resolution stage gets 3d_fullres and a message (docs/planning.md), and asked for alone, 3d_lowres
    is an error that names what was planned."""
    out = trained["planned"].stdout
    assert "3d_lowres: not in LoGoNetTinyPlans" in out and "skipped" in out
    assert (trained["preprocessed"] / "nnUNetPlans_3d_fullres").is_dir()
    assert not list(trained["preprocessed"].glob("*3d_lowres*"))
    proc = run(["logonet_plan_and_preprocess", "-d", "900", "-pl", "LoGoNetTinyPlanner", "-c", "3d_lowres",
                "-np", "1", "-npfp", "1"], trained["env"], check=False, timeout=300)
    assert proc.returncode == 2
    assert "none of -c 3d_lowres is in LoGoNetTinyPlans" in proc.stderr and "Use -c 3d_fullres" in proc.stderr
