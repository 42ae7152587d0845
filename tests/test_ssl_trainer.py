"""LoGoNetSSLTrainer end to end: pre-training through nnU-Net's commands, resume, cache, transfer.

The slow tests share one small phantom (32^2 in-plane, patch 12x32x32 with the tiny planner),
the image-only pre-training dataset made from it by ``prepare_pretraining_dataset`` and one
pre-training run through the real ``nnUNetv2_train`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_logonet.network import LoGoNet, ULKANet
from nnunet_logonet.ssl.clusterers import SliceClusterBank
from nnunet_logonet.ssl.features import PreClassifierFeatures, unwrap_network
from nnunet_logonet.ssl.transfer import (
    PretrainedMismatchError,
    check_pretrained,
    compare_pretrained,
    pretrained_weights_from_argv,
)

LABELED, PRETRAIN = 910, 911
PLANS = "LoGoNetTinyPlans"
TRAINER = "LoGoNetSSLTrainer_ciTest"
EPOCHS = 2  # the first run; the resume test adds one more epoch

# a short variant for the tests, found by nnUNetv2_train through nnUNet_extTrainer like ours
TEST_TRAINER_MODULE = textwrap.dedent(f'''
    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainerCPU

    class {TRAINER}(LoGoNetSSLTrainerCPU):
        cluster_fit_patches = 40

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = {EPOCHS}
            # 10: with 5 the epoch means were noise in 5 of 12 runs (loss 3.57 -> 3.58, accuracy at
            # chance); with 10 the loss fell 0.10-0.50 and accuracy reached 3.5-6.4x chance in 5 of 5
            self.num_iterations_per_epoch = 10
            self.num_val_iterations_per_epoch = 1
''')


# ------------------------------------------------------------------------------ fast unit tests
def tiny_logonet(num_classes: int = 3) -> LoGoNet:
    torch.manual_seed(0)
    return LoGoNet.from_preset("tiny", 1, num_classes, (32, 32, 32))


def test_hook_gives_the_classifier_input_and_sees_through_wrappers():
    net = tiny_logonet().eval()
    seen = {}
    net.head.seg_layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    tap = PreClassifierFeatures(torch.compile(net))  # lazy: nothing is compiled until called
    with torch.no_grad():
        net(torch.randn(2, 1, 32, 32, 32))
    features = tap.pop()
    assert features.shape == (2, tap.channels, 32, 32, 32) and tap.channels == net.head.conv.out_channels
    assert torch.equal(features, seen["x"])
    with pytest.raises(RuntimeError, match="run the network forward"):
        tap.pop()  # released after use: a stale feature map is never reused
    assert unwrap_network(torch.compile(net)) is net


def test_unwrap_looks_through_nested_wrappers():
    """nnU-Net compiles, then wraps in DDP (or the other way round): each layer is looked through."""

    class Compiled(nn.Module):  # what torch.compile's OptimizedModule exposes
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    net = tiny_logonet()
    assert unwrap_network(Compiled(Compiled(net))) is net


def test_hook_refuses_a_network_without_logonet_head():
    with pytest.raises(ValueError, match="LoGoNet planner"):
        PreClassifierFeatures(nn.Sequential(nn.Conv3d(1, 2, 3)))
    no_conv = nn.Module()
    no_conv.head = nn.Module()
    no_conv.head.act = nn.GELU()  # an activation, but no head.conv to read the channels from
    with pytest.raises(ValueError, match="LoGoNet planner"):
        PreClassifierFeatures(no_conv)


def test_pretrained_path_is_read_from_the_nnunet_command_line():
    argv = ["nnUNetv2_train", "1", "3d_fullres", "0", "-pretrained_weights", "/x/ckpt.pth", "-device", "cpu"]
    assert pretrained_weights_from_argv(argv) == "/x/ckpt.pth"
    assert pretrained_weights_from_argv(["nnUNetv2_train", "-pretrained_weights=/y.pth"]) == "/y.pth"
    assert pretrained_weights_from_argv(["nnUNetv2_train", "1", "3d_fullres", "0"]) is None
    assert pretrained_weights_from_argv(["nnUNetv2_train", "1", "3d_fullres", "0", "-pretrained_weights"]) is None


def test_compare_pretrained_accepts_own_weights_and_lists_every_difference(tmp_path):
    net = tiny_logonet(num_classes=3)
    other_classes = tiny_logonet(num_classes=7)  # only the classifiers differ: loads, as in nnU-Net
    ckpt = {"network_weights": other_classes.state_dict()}
    assert compare_pretrained(net, ckpt) == []
    wider = LoGoNet.from_preset("tiny", 1, 3, (32, 32, 32), dims=[8, 16, 32, 96])
    differences = compare_pretrained(wider, ckpt)
    assert differences and all(d.startswith("shape differs") for d in differences)
    assert any("global_path" in d for d in differences)
    torch.save({"network_weights": {k: v for k, v in net.state_dict().items() if "head.conv" not in k}},
               tmp_path / "partial.pth")
    with pytest.raises(PretrainedMismatchError, match=r"2 key\(s\) missing") as error:
        check_pretrained(net, tmp_path / "partial.pth")
    assert "head.conv.weight" in str(error.value) and "head.conv.bias" in str(error.value)
    with pytest.raises(PretrainedMismatchError) as error:
        check_pretrained(net, tmp_path / "partial.pth", max_lines=1)  # a long list is cut, saying how much
    listed = [line for line in str(error.value).splitlines() if "missing in checkpoint" in line]
    assert len(listed) == 1 and "... and 1 more" in str(error.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedMismatchError, match="unreadable"):
        compare_pretrained(net, tmp_path / "junk.pth")
    assert "Pretrain with the same plans" in str(error.value)  # no plans in the file: same network assumed


@pytest.mark.parametrize("source, target, pretrain", [
    ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "LoGoNet", True),
    ("nnunet_logonet.network.ulkanet.ULKANet", "LoGoNet", True),
    ("nnunet_logonet.network.logonet.LoGoNet", "ULKANet", False),
])
def test_weights_of_another_network_are_named_as_such_with_a_fix_that_can_work(tmp_path, source, target, pretrain):
    """nnU-Net's own network's checkpoint (or the other of ours) into LoGoNet: no plans can make it fit, so the
    fix is not "pretrain with the same plans" but LoGoNet weights (pre-training exists for LoGoNet only)."""
    net = tiny_logonet(num_classes=3) if target == "LoGoNet" else ULKANet.from_preset("tiny", 1, 3, (32, 32, 32))
    weights = {"conv.weight": torch.zeros(4, 1, 3, 3, 3)}
    init = {"configuration": "3d_fullres", "plans": {"plans_name": "P", "configurations": {
        "3d_fullres": {"architecture": {"network_class_name": source}}}}}
    torch.save({"network_weights": weights, "init_args": init, "trainer_name": "T"}, tmp_path / "other.pth")
    with pytest.raises(PretrainedMismatchError) as error:
        check_pretrained(net, tmp_path / "other.pth")
    message = str(error.value)
    assert f"These are weights of a {source.rsplit('.', 1)[-1]}, not of a {target}" in message
    assert ("-tr LoGoNetSSLTrainer" in message) == pretrain and "train without -pretrained_weights" in message
    assert "Pretrain with the same plans" not in message


def test_compare_pretrained_names_checkpoint_keys_the_network_would_drop(tmp_path):
    """8 local paths into a LoGoNet with 4 (local_grid 1x2x2, as planned for a thin phantom): nnU-Net's
    loader drops local_paths.4-7 silently and paths 0-3 get weights learned on other sub-crops."""
    eight = tiny_logonet(num_classes=3)
    four = LoGoNet.from_preset("tiny", 1, 3, (32, 32, 32), local_grid=(1, 2, 2))
    torch.save({"network_weights": eight.state_dict()}, tmp_path / "eight.pth")
    differences = compare_pretrained(four, tmp_path / "eight.pth")
    assert differences and all(d.startswith("not in network: local_paths.") for d in differences), differences[:3]
    assert {d.split(".")[1] for d in differences} == {"4", "5", "6", "7"}
    with pytest.raises(PretrainedMismatchError, match=rf"0 key\(s\) missing, {len(differences)} not in the network, "
                                                      r"0 shape mismatch"):
        check_pretrained(four, tmp_path / "eight.pth")
    # the classifiers stay skipped both ways, and a wrapper's 'module.' prefix is looked through
    ckpt = {"network_weights": {f"module.{k}": v for k, v in tiny_logonet(num_classes=7).state_dict().items()}}
    assert compare_pretrained(eight, ckpt) == []
    # classifiers the network lacks (a deep-supervision output it does not have) are skipped too
    ckpt["network_weights"]["module.head.seg_layers.9.weight"] = torch.zeros(3, 8, 1, 1, 1)
    assert compare_pretrained(eight, ckpt) == []


def _sync_head_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from nnunet_logonet.training.ssl_trainer import sync_head_from_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for reset in (False, True):
            torch.manual_seed(rank)  # every rank starts from its own head, as after a reset on rank 0 only
            head = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            optimizer = torch.optim.AdamW(head.parameters())
            head(torch.randn(5, 4)).sum().backward()
            optimizer.step()
            sync_head_from_rank0(head, optimizer, reset_on_rank0=reset and rank == 0)
            torch.save({"weights": head.state_dict(), "moments": len(optimizer.state)},
                       f"{folder}/rank{rank}_reset{reset}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_take_rank0_head_and_drop_its_moments_when_rank0_reset_it(tmp_path):
    """On a resume whose refitted bank differs, only rank 0 resets the head; the other ranks used to
    keep the checkpoint's head, and DDP (which syncs gradients, not weights) never reconciled them."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sync_head_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for reset in (False, True):
        ranks = [torch.load(tmp_path / f"rank{r}_reset{reset}.pt") for r in range(2)]
        for key, value in ranks[0]["weights"].items():
            assert torch.equal(value, ranks[1]["weights"][key]), (reset, key)
        # AdamW's state of the 4 parameters (Linear and BatchNorm weight and bias): dropped on every rank
        # when rank 0 reset the head, kept otherwise
        assert [rank["moments"] for rank in ranks] == ([0, 0] if reset else [4, 4])


# ------------------------------------------------------------------------------ end to end
def _env(base: Path, ext: Path) -> dict[str, str]:
    from nnunet_logonet.env import environment

    env = {"nnUNet_raw": str(base / "raw"), "nnUNet_preprocessed": str(base / "pre"),
           "nnUNet_results": str(base / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f"}
    variables = environment(base, env)
    variables["nnUNet_extTrainer"] += os.pathsep + str(ext)
    return {**env, **variables}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Phantom (labeled + unlabeled) -> tiny plans -> image-only pre-training dataset -> one
    pre-training run through ``nnUNetv2_train``."""
    from nnunet_logonet.phantom import write_dataset
    from nnunet_logonet.ssl.pipeline import prepare_pretraining_dataset

    base = tmp_path_factory.mktemp("ssl")
    ext = base / "ext_trainers"
    ext.mkdir()
    (ext / "logonet_ssl_test_trainers.py").write_text(TEST_TRAINER_MODULE)
    env = _env(base, ext)
    write_dataset(base / "raw", LABELED, name="SSLPhantom", num_train=4, num_test=0, num_unlabeled=3, size=32)
    bin_dir = Path(sys.executable).parent
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 crashes it
    subprocess.run([str(bin_dir / "logonet_plan_and_preprocess"), "-d", str(LABELED), "-pl", "LoGoNetTinyPlanner",
                    "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env={**os.environ, **env, "nnUNet_n_proc_DA": "1"},
                   check=True, capture_output=True, timeout=300)
    steps, again = [], []
    first = prepare_pretraining_dataset(LABELED, PRETRAIN, PLANS, name="SSLPretrain", env={**os.environ, **env},
                                        log=steps.append)  # finds the phantom's imagesUnlabeled itself
    second = prepare_pretraining_dataset(LABELED, PRETRAIN, PLANS, name="SSLPretrain", env={**os.environ, **env},
                                         log=again.append)
    # a scan of the image-only dataset written again (as logonet_prepare_unlabeled --overwrite does): its
    # fingerprint and preprocessed cases describe the old data, so both are made again
    scan = sorted((base / "raw" / f"Dataset{PRETRAIN:03d}_SSLPretrain" / "imagesTr").glob("*.nii.gz"))[0]
    scan.write_bytes(scan.read_bytes())
    redo_steps: list[str] = []
    redone = prepare_pretraining_dataset(LABELED, PRETRAIN, PLANS, name="SSLPretrain", env={**os.environ, **env},
                                         log=redo_steps.append)
    run = subprocess.run([str(bin_dir / "nnUNetv2_train"), str(PRETRAIN), "3d_fullres", "all", "-tr", TRAINER,
                          "-p", PLANS, "-device", "cpu"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fold = base / "res" / f"Dataset{PRETRAIN}_SSLPretrain" / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_all"
    return {"base": base, "env": env, "fold": fold, "steps": steps, "again": again, "first": first,
            "second": second, "redone": redone, "redo_steps": redo_steps}


def _log_text(fold: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))


def _final(fold: Path) -> dict:
    return torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)


@pytest.mark.e2e
def test_pretraining_dataset_is_built_once_with_the_labeled_plans(workspace):
    import json

    pre = workspace["base"] / "pre"
    assert workspace["first"]["skipped"] == [] and len(workspace["first"]["ran"]) == 5, workspace["steps"]
    assert workspace["second"]["ran"] == [], workspace["again"]  # idempotent: every step skipped
    assert workspace["redone"]["ran"] == ["extract_fingerprint", "preprocess"], workspace["redo_steps"]
    assert any("was written after its fingerprint" in s for s in workspace["redo_steps"])
    assert any("preprocessing again" in s for s in workspace["redo_steps"])
    assert any("nnUNetv2_move_plans_between_datasets" in s for s in workspace["steps"])
    source = json.loads((pre / f"Dataset{LABELED}_SSLPhantom" / f"{PLANS}.json").read_text())
    target = json.loads((pre / f"Dataset{PRETRAIN}_SSLPretrain" / f"{PLANS}.json").read_text())
    assert target["configurations"] == source["configurations"]
    assert target["foreground_intensity_properties_per_channel"] == \
        source["foreground_intensity_properties_per_channel"]
    data = pre / f"Dataset{PRETRAIN}_SSLPretrain" / source["configurations"]["3d_fullres"]["data_identifier"]
    assert len(list(data.glob("*.pkl"))) == 4 + 3  # labeled images and unlabeled scans


@pytest.mark.e2e
def test_checkpoint_has_no_classifier_and_keeps_head_and_bank(workspace):
    fold = workspace["fold"]
    checkpoint = _final(fold)
    assert checkpoint["network_weights"] and not any(".seg_layers." in k for k in checkpoint["network_weights"])
    assert any(k.startswith("head.conv") for k in checkpoint["network_weights"])
    head = checkpoint["ssl_head_weights"]
    assert head["fc2.weight"].shape[0] == sum(checkpoint["ssl"]["ks"])
    bank = SliceClusterBank.load(checkpoint["ssl"]["bank_path"])
    assert Path(checkpoint["ssl"]["bank_path"]) == fold / "clusterers.npz"
    assert list(bank.ks) == checkpoint["ssl"]["ks"]


@pytest.mark.e2e
def test_training_log_reports_the_pretext_and_its_cost(workspace):
    """docs/ssl.md, "Logs": the bank at the start (and that it is smaller than the paper's), per epoch
    the SSL losses, the pseudo-label accuracy against chance and the labelling time, at the end the
    share of pseudo-labelling in the pre-training wall time; the figures agree with each other."""
    import re

    fold = workspace["fold"]
    ks = _final(fold)["ssl"]["ks"]
    chance = float(np.mean([1 / k for k in ks]))
    first_run = min(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime_ns)  # before any resume
    log = first_run.read_text()
    start = re.search(r"SSL pre-training: (\d+) clusterers, k (\d+)\.\.(\d+) \(sum (\d+), chance accuracy ([\d.]+)\)", log)
    assert start, log[:2000]
    assert [int(g) for g in start.groups()[:4]] == [len(ks), min(ks), max(ks), sum(ks)]
    assert float(start.group(5)) == pytest.approx(chance, abs=1e-4)
    assert "INFO: reduced pseudo-label bank for this budget: 12 clusterers, k drawn from 16..64, pool 2 (paper: 80, " \
           "80..500, raw slices)" in log
    epochs = re.findall(r"pseudo-label accuracy: train ([\d.]+|n/a \([^)]*\)), val ([\d.]+|n/a \([^)]*\)) "
                        r"\(chance ([\d.]+)\)", log)
    assert len(epochs) == EPOCHS and all(float(c) == pytest.approx(chance, abs=1e-4) for _, _, c in epochs)
    logging = _final(fold)["logging"]
    assert [float("nan") if t.startswith("n/a") else float(t) for t, _, _ in epochs] == \
        pytest.approx(logging["ssl_train_accuracy"][:EPOCHS], abs=1e-4, nan_ok=True)
    # (an epoch whose batches had no masked slice, ~8 % of batches each, says so instead of a number)
    figure = r"(?:[\d.]+|n/a \(no masked slice in this epoch's (?:training|validation) batches\))"
    assert len(re.findall(r"train_loss " + figure, log)) == len(re.findall(r"val_loss " + figure, log)) == EPOCHS
    times = [tuple(map(float, m)) for m in re.findall(r"Epoch time: ([\d.]+) s \(pseudo-labelling ([\d.]+) s\)", log)]
    assert len(times) == EPOCHS and all(0 < label < epoch for epoch, label in times)
    cost = re.search(r"Pseudo-label cost: fitting/loading ([\d.]+) s \+ labelling ([\d.]+) s = ([\d.]+)% of "
                     r"([\d.]+) s pre-training wall time", log)
    assert cost, log[-2000:]
    fit, label, share, wall = map(float, cost.groups())
    assert label == pytest.approx(sum(label for _, label in times), abs=0.005 * (EPOCHS + 1)), cost.group(0)
    assert fit > 0 and wall >= sum(epoch for epoch, _ in times) - 0.01 * EPOCHS, cost.group(0)
    # each figure rounded to 0.01 s, the share to 0.1 %
    assert share == pytest.approx(100 * (fit + label) / wall, abs=100 * 0.011 / wall + 0.06), cost.group(0)


@pytest.mark.e2e
def test_predicting_with_the_pretraining_checkpoint_says_to_fine_tune_it_first(workspace, tmp_path):
    """nnUNetv2_predict on the pre-training's results folder: the model has no classifiers and learned no
    segmentation; the error says so and names the command, instead of PyTorch's list of missing keys."""
    images = tmp_path / "images"
    images.mkdir()
    scan = sorted((workspace["base"] / "raw" / f"Dataset{LABELED:03d}_SSLPhantom" / "imagesTr").glob("*.nii.gz"))[0]
    (images / scan.name).write_bytes(scan.read_bytes())
    run = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(images), "-o",
                          str(tmp_path / "out"), "-d", str(PRETRAIN), "-c", "3d_fullres", "-f", "all", "-tr", TRAINER,
                          "-p", PLANS, "-device", "cpu"], env={**os.environ, **workspace["env"]},
                         capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "ClassifierlessWeightsError: The weights given to LoGoNet have no classifiers" in output, output[-3000:]
    assert "-tr LoGoNetTrainer -p PLANS -pretrained_weights" in output
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.e2e
def test_ssl_weights_load_through_nnunet_into_logonet_trainer(workspace, monkeypatch):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import get_trainer_from_args

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    ckpt = workspace["fold"] / "checkpoint_final.pth"
    trainer = get_trainer_from_args(str(LABELED), "3d_fullres", "all", "LoGoNetTrainer", PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    assert compare_pretrained(trainer.network, ckpt) == []
    load_pretrained_weights(trainer.network, str(ckpt))  # nnU-Net's loader, unchanged
    pretrained = _final(workspace["fold"])["network_weights"]
    state = trainer.network.state_dict()
    transferred = [k for k in state if ".seg_layers." not in k]
    assert len(transferred) == len(pretrained)
    assert all(torch.equal(state[k], pretrained[k]) for k in transferred)


@pytest.mark.e2e
def test_finetune_start_trains_both_starts_on_one_batch_and_loads_the_checkpoint(workspace, tmp_path):
    """``benchmark.finetune_start``: scratch and pre-trained start per seed on the same batch; the
    pre-trained start carries every checkpoint weight, the classifier is the seed's in both."""
    import json

    from nnunet_logonet.benchmark import finetune_start as fs

    ckpt = workspace["fold"] / "checkpoint_final.pth"
    pre = workspace["base"] / "pre"
    out = tmp_path / "report.json"
    assert fs.main(["-d", str(LABELED), "-p", PLANS, "--pretrained", str(ckpt), "--seeds", "3", "--steps", "2",
                    "--report-every", "1", "--lr", "5e-3", "--preprocessed", str(pre), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lr"] == 5e-3 and report["weight_decay"] == 3e-5 and report["recipe"] == "nnunet"
    assert report["steps"] == 2
    assert [(r["seed"], r["start"]) for r in report["runs"]] == [(3, "scratch"), (3, "pretrained")]
    assert report["cases"] == ["SSLPhantom_000", "SSLPhantom_001"]
    for run in report["runs"]:
        assert [h["step"] for h in run["history"]] == [1, 2]
        assert all(np.isfinite(h["loss"]) and len(h["dice"]) == 6 for h in run["history"])
    assert set(report["summary"]) == {"scratch", "pretrained"}
    # the paper's recipe (docs/ssl.md: AdamW at its 1e-4, weight decay 1e-5): the report says what was used
    paper = tmp_path / "paper.json"
    assert fs.main(["-d", str(LABELED), "-p", PLANS, "--pretrained", str(ckpt), "--seeds", "3", "--steps", "2",
                    "--recipe", "paper", "--report-every", "1", "--preprocessed", str(pre), "--json", str(paper),
                    "--chart", str(tmp_path / "charts" / "starts.png")]) == 0
    assert (tmp_path / "charts" / "starts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "charts").iterdir()] == ["starts.png"]  # no temporary file left
    paper = json.loads(paper.read_text())
    assert (paper["recipe"], paper["lr"], paper["weight_decay"]) == ("paper", 1e-4, 1e-5)
    for sgd, adamw in zip(report["runs"], paper["runs"]):
        # the same start and batch: the same loss before the first update, another one after it
        assert sgd["history"][0]["loss"] == pytest.approx(adamw["history"][0]["loss"], rel=1e-5)
        assert sgd["history"][1]["loss"] != pytest.approx(adamw["history"][1]["loss"], rel=1e-4)

    folder = fs.preprocessed_dataset(str(LABELED), pre)
    plans_manager, configuration_manager = fs.load_plans(folder, PLANS, "3d_fullres")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    pretrained = fs.build_start(plans_manager, configuration_manager, dataset_json, "pretrained", 3, ckpt).state_dict()
    scratch = fs.build_start(plans_manager, configuration_manager, dataset_json, "scratch", 3).state_dict()
    weights = _final(workspace["fold"])["network_weights"]
    assert all(torch.equal(pretrained[k], v) for k, v in weights.items())
    assert not all(torch.equal(scratch[k], v) for k, v in weights.items())
    classifier = [k for k in pretrained if ".seg_layers." in k]
    assert classifier and all(torch.equal(pretrained[k], scratch[k]) for k in classifier)

    x, y, _ = fs.fixed_batch(folder, configuration_manager.data_identifier, configuration_manager.patch_size, 2)
    assert tuple(x.shape) == (2, 1, *configuration_manager.patch_size) and tuple(y.shape) == (2, 1, *x.shape[2:])
    assert y.min() >= 0 and y.max() > 0


@pytest.mark.e2e
def test_finetune_start_reads_the_pretrained_file_before_any_training(workspace, tmp_path, monkeypatch):
    """An unreadable file was reported only after the whole scratch run of the first seed."""
    from nnunet_logonet.benchmark import finetune_start as fs
    from nnunet_logonet.ssl.transfer import PretrainedMismatchError

    junk = tmp_path / "junk.pth"
    junk.write_text("junk")
    fits = []
    monkeypatch.setattr(fs, "fit_batch", lambda *args, **kwargs: fits.append(args) or [])
    with pytest.raises(PretrainedMismatchError, match="junk.pth is unreadable"):
        fs.compare_starts(str(LABELED), PLANS, junk, seeds=(0,), steps=1, preprocessed=workspace["base"] / "pre")
    assert fits == []


def test_finetune_start_refuses_bad_settings_before_loading_anything(tmp_path, capsys):
    from nnunet_logonet.benchmark import finetune_start as fs

    base = ["-d", "123", "-p", "LoGoNetPlans", "--pretrained", str(tmp_path / "missing.pth")]
    for flags, said in ((["--steps", "0"], "--steps must be >= 1, got 0"), (["--cases", "0"], "--cases must be >= 1"),
                        (["--report-every", "-1"], "--report-every must be >= 1"),
                        (["--lr", "0"], "--lr must be > 0, got 0 (leave it out for the recipe's initial rate)"),
                        (["--recipe", "adam"], "invalid choice: 'adam'")):
        with pytest.raises(SystemExit) as stop:
            fs.main(base + flags)
        assert stop.value.code == 2 and said in capsys.readouterr().err


def test_finetune_start_names_what_is_missing(tmp_path):
    from nnunet_logonet.benchmark import finetune_start as fs

    ckpt = tmp_path / "ckpt.pth"
    with pytest.raises(FileNotFoundError, match="ckpt.pth does not exist"):
        fs.compare_starts("123", "LoGoNetPlans", ckpt, preprocessed=tmp_path)
    torch.save({"network_weights": {}}, ckpt)
    with pytest.raises(FileNotFoundError, match=r"Dataset123_\* in .*found none.*logonet_plan_and_preprocess -d 123"):
        fs.compare_starts("123", "LoGoNetPlans", ckpt, preprocessed=tmp_path)
    (tmp_path / "Dataset123_X").mkdir()
    (tmp_path / "Dataset123_X" / "nnUNetPlans.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"LoGoNetPlans.json does not exist \(plans here: nnUNetPlans\)"):
        fs.compare_starts("123", "LoGoNetPlans", ckpt, preprocessed=tmp_path)


def test_finetune_start_command_reports_errors_in_one_line(tmp_path, capsys):
    from nnunet_logonet.benchmark import finetune_start as fs

    assert fs.main(["-d", "123", "-p", "LoGoNetPlans", "--pretrained", str(tmp_path / "ckpt.pth"),
                    "--preprocessed", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"finetune_start: error: pretrained weights file {tmp_path / 'ckpt.pth'} does not exist.\n"


@pytest.mark.e2e
def test_weights_of_another_preset_are_reported_in_full(workspace):
    ckpt = workspace["fold"] / "checkpoint_final.pth"
    small = LoGoNet.from_preset("S", 1, 3, (64, 64, 64))
    differences = compare_pretrained(small, ckpt)
    assert any(d.startswith("missing in checkpoint") for d in differences)
    assert any(d.startswith("shape differs") for d in differences)
    with pytest.raises(PretrainedMismatchError) as error:
        check_pretrained(small, ckpt)
    message = str(error.value)
    assert "LoGoNet-tiny" in message and PLANS in message and "key(s) missing" in message
    assert "move_plans_between_datasets" in message


def test_pretraining_defaults_are_the_papers():
    """Every pretext setting of ``LoGoNetSSLTrainer`` against the paper (docs/ssl.md); the library's defaults
    are pinned beside their classes. The budget (1000 epochs) and the torch backend are our documented choices."""
    from nnunet_logonet.training.ssl_trainer import PAPER_BANK, LoGoNetSSLTrainer, LoGoNetSSLTrainer_100epochs

    paper = dict(cluster_num=80, cluster_k_range=(80, 500), cluster_sample_fraction=0.1, cluster_pool=1,
                 cluster_max_iter=350, mask_phi1=0.1, mask_chain_length=5,
                 mask_patch_sizes=(1, 2, 4, 8, 16, 32, "full"), mask_phi2=0.7, ssl_tau=0.1, ssl_initial_lr=1e-4,
                 ssl_weight_decay=1e-5)
    assert {name: getattr(LoGoNetSSLTrainer, name) for name in paper} == paper
    assert PAPER_BANK == {"num_clusterers": 80, "k_range": (80, 500), "pool": 1}
    assert LoGoNetSSLTrainer_100epochs.__mro__[1] is LoGoNetSSLTrainer


@pytest.mark.e2e
def test_pretraining_optimizer_is_the_papers_adamw(workspace, monkeypatch):
    """AdamW, betas (0.9, 0.999), lr 1e-4 and weight decay 1e-5 over the network and the pretext head."""
    import json

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer

    for key, env_value in workspace["env"].items():
        monkeypatch.setenv(key, env_value)
    pre = workspace["base"] / "pre" / f"Dataset{PRETRAIN}_SSLPretrain"
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = LoGoNetSSLTrainer({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json,
                                torch.device("cpu"))
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager, dataset_json)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, channels,
        trainer.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    optimizer, _ = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert (group["initial_lr"], group["weight_decay"], group["betas"]) == (1e-4, 1e-5, (0.9, 0.999))
    trained = {id(p) for p in group["params"]}
    assert {id(p) for p in trainer.network.parameters()} | {id(p) for p in trainer.ssl_head.parameters()} == trained


def _resume(workspace, monkeypatch, epochs: int):
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    trainer = get_trainer_from_args(str(PRETRAIN), "3d_fullres", "all", TRAINER, PLANS, continue_training=True,
                                    device=torch.device("cpu"))
    trainer.num_epochs = epochs  # a trainer attribute, set before nnU-Net's --c loads the checkpoint
    maybe_load_checkpoint(trainer, True, False)  # what nnUNetv2_train --c does
    trainer.run_training()
    return trainer


@pytest.mark.e2e
def test_resume_reuses_the_clusterers_and_never_reads_labels(workspace, monkeypatch):
    fold = workspace["fold"]
    cache = fold / "clusterers.npz"
    before = cache.stat().st_mtime_ns
    trainer = _resume(workspace, monkeypatch, EPOCHS + 1)
    assert cache.stat().st_mtime_ns == before
    assert "Reusing the cluster cache" in _log_text(fold) and "Fitted" not in _log_text(fold).split("Reusing")[-1]
    logging = _final(fold)["logging"]
    assert len(logging["train_losses"]) == EPOCHS + 1 and _final(fold)["current_epoch"] == EPOCHS + 1
    patch = trainer.configuration_manager.patch_size
    # no 'target' key at all; a batch whose masking drew no slice has no loss (NaN, about 8 % of these small
    # batches; docs/ssl.md), so a few batches: one of them has a masked slice
    losses = [trainer.train_step({"data": torch.randn(2, 1, *patch)})["loss"] for _ in range(5)]
    assert any(np.isfinite(loss) for loss in losses), losses


def _scores_on_fixed_batches(trainer, batches) -> tuple[float, float]:
    """Mean pretext loss and pseudo-label accuracy with the same masks for every model."""
    losses, accuracies = [], []
    trainer.network.train()
    trainer.ssl_head.train()
    with torch.no_grad():
        for i, x in enumerate(batches):
            torch.manual_seed(i)
            loss, accuracy = trainer.pretext_loss(x)
            if torch.isfinite(accuracy):  # a draw without masked slices carries no information
                losses.append(float(loss))
                accuracies.append(float(accuracy))
    return float(np.mean(losses)), float(np.mean(accuracies))


@pytest.mark.e2e
def test_pretraining_learns_the_pseudo_labels(workspace, monkeypatch):
    from nnunetv2.run.run_training import get_trainer_from_args

    fold = workspace["fold"]
    checkpoint = _final(fold)
    logging = checkpoint["logging"]
    assert len(logging["train_losses"]) == checkpoint["current_epoch"] >= EPOCHS
    assert np.isfinite(logging["train_losses"]).all()
    chance = float(np.mean([1 / k for k in checkpoint["ssl"]["ks"]]))
    assert logging["ssl_train_accuracy"][-1] > chance

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    trainer = get_trainer_from_args(str(PRETRAIN), "3d_fullres", "all", TRAINER, PLANS, device=torch.device("cpu"))
    trainer.load_checkpoint(str(fold / "checkpoint_final.pth"))
    trainer.bank = SliceClusterBank.load(fold / "clusterers.npz")
    _, loader = trainer.get_dataloaders()
    np.random.seed(0)  # nnU-Net's loader crops with numpy's global generator
    batches = [next(loader)["data"] for _ in range(16)]  # 6 gave noisy means in full-suite runs
    trained_loss, trained_accuracy = _scores_on_fixed_batches(trainer, batches)
    trainer.network.apply(LoGoNet.initialize)
    trainer.ssl_head.apply(trainer.ssl_head._init_weights)
    fresh_loss, fresh_accuracy = _scores_on_fixed_batches(trainer, batches)
    # near uniform at start: the head's small initial logits, sharpened by tau = 0.1, put the loss
    # a little above log k (3.63-3.65 vs 3.51 with tiny's 16-channel features)
    assert fresh_loss == pytest.approx(np.mean(np.log(checkpoint["ssl"]["ks"])), abs=0.4), (fresh_loss, fresh_accuracy)
    # the loss falls over the run (nnU-Net's log of the training epochs) and the pseudo-labels are
    # learned well above chance; on the fixed batches the trained model's tempered (tau 0.1) loss
    # after 2 epochs may still sit above a fresh model's near-uniform one (measured 3.70 vs 3.63
    # while its training loss fell 3.55 -> 3.44), so there only its accuracy is compared to chance
    # (lowest later epoch: the tempered loss of one 10-iteration epoch is spiky; a CI run logged
    # 3.58 -> 3.20 -> 3.71 while the pseudo-label accuracy went 0.05 -> 0.21 -> 0.12, chance 0.033).
    # It is compared with the untrained model's loss, not with the first epoch's mean, which already
    # includes that epoch's learning: a full-suite run logged 3.35 -> 3.50 -> 3.30 (fresh model ~3.6)
    assert min(logging["train_losses"][1:]) < fresh_loss - 0.05, (logging["train_losses"], fresh_loss)
    # likewise the best later epoch's pseudo-label accuracy: one epoch's is as spiky (a CI run on 12-07 logged
    # 0.051 -> 0.094 -> 0.047, chance 0.033; the last epoch alone failed 1.5x chance)
    assert max(logging["ssl_train_accuracy"][1:]) > 1.5 * chance, (logging["ssl_train_accuracy"], chance)
    assert trained_accuracy > chance, (trained_accuracy, fresh_accuracy, trained_loss, fresh_loss, chance)

    log = _log_text(fold)
    assert "Labels of the dataset are not used" in log and "pre-training wall time" in log
    assert "no segmentation validation" in log
    assert (fold / "progress.png").stat().st_size > 10_000
    assert not (fold / "validation").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("damage, logged", [
    (lambda cache: cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2]), "unreadable"),
    (lambda cache: cache.unlink(), "no cluster cache"),  # docs/ssl.md: a missing cache is refitted too
], ids=["corrupt", "missing"])
def test_corrupt_cluster_cache_is_detected_and_rebuilt(workspace, monkeypatch, damage, logged):
    fold = workspace["fold"]
    cache = fold / "clusterers.npz"
    damage(cache)
    _resume(workspace, monkeypatch, EPOCHS + 1)  # already finished: only the start-up runs
    log = _log_text(fold).split("Reusing the cluster cache")[-1]
    assert logged in log and "refitting the clusterers" in log.lower()
    bank = SliceClusterBank.load(cache)  # rewritten, intact
    assert list(bank.ks) == _final(fold)["ssl"]["ks"]
    # the seeded refit gives the checkpoint's bank again, else the head must be reset
    assert "equal the checkpoint's" in log or "head restarts from random weights" in log


@pytest.mark.e2e
@pytest.mark.parametrize("setting, value, match", [
    # the clusterers' and the masking's messages name the trainer's attribute, not their own parameter
    ("cluster_k_range", (64, 16), r"LoGoNetSSLTrainerBad.cluster_k_range must be two ints"),
    ("cluster_num", 0, r"LoGoNetSSLTrainerBad.cluster_num must be an int >= 1, got 0"),
    ("cluster_backend", "scipy", r"LoGoNetSSLTrainerBad.cluster_backend must be one of"),
    ("mask_phi1", 1.5, r"LoGoNetSSLTrainerBad.mask_phi1 must"),
    ("mask_chain_length", 0, r"LoGoNetSSLTrainerBad.mask_chain_length \(M\) must"),
    ("cluster_fit_patches", 0, "cluster_fit_patches"),
    # these were read first after the clusterers had been fitted, or clamped without a word
    ("ssl_tau", 0, r"LoGoNetSSLTrainerBad.ssl_tau must be a finite number > 0.0, got 0"),
    ("ssl_tau", float("inf"), "ssl_tau"), ("head_grid", 0, "head_grid"), ("head_hidden", 0, "head_hidden"),
    ("ssl_initial_lr", -1.0, "ssl_initial_lr"), ("ssl_weight_decay", -1e-5, "ssl_weight_decay"),
    ("ssl_warmup_fraction", 5.0, r"ssl_warmup_fraction must be a finite number >= 0.0 and <= 1.0, got 5.0"),
    ("cluster_samples_per_cluster", 0, "cluster_samples_per_cluster")])
def test_bad_settings_fail_in_the_constructor(workspace, monkeypatch, setting, value, match):
    import json

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainerCPU

    for key, env_value in workspace["env"].items():
        monkeypatch.setenv(key, env_value)
    pre = workspace["base"] / "pre" / f"Dataset{PRETRAIN}_SSLPretrain"
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    bad = type("LoGoNetSSLTrainerBad", (LoGoNetSSLTrainerCPU,), {setting: value})
    with pytest.raises(ValueError, match=match):
        bad({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json, torch.device("cpu"))
    # checked before nnU-Net makes the output folder and its log
    results = Path(workspace["env"]["nnUNet_results"]) / f"Dataset{PRETRAIN}_SSLPretrain"
    assert not list(results.glob("LoGoNetSSLTrainerBad__*"))


@pytest.mark.e2e
def test_the_cpu_pretraining_checkpoints_every_epoch(workspace, monkeypatch):
    """nnU-Net writes checkpoint_latest every 50 epochs; on a CPU, where an epoch takes minutes, a run stopped
    before epoch 50 had nothing for --c ("no checkpoint ... Starting a new training")."""
    import json

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer, LoGoNetSSLTrainerCPU

    for name, env_value in workspace["env"].items():
        monkeypatch.setenv(name, env_value)
    pre = workspace["base"] / "pre" / f"Dataset{PRETRAIN}_SSLPretrain"
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    cpu, gpu = (trainer({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json, torch.device("cpu"))
                for trainer in (LoGoNetSSLTrainerCPU, LoGoNetSSLTrainer))
    assert (cpu.save_every, gpu.save_every) == (1, 50)


@pytest.mark.e2e
@pytest.mark.parametrize("attribute, setting", [("cluster_pool", "pool"), ("cluster_seed", "seed")])
def test_resume_with_other_bank_settings_is_refused_naming_both(workspace, monkeypatch, attribute, setting):
    """Only ks used to be compared: a --c with another pool (same ks) refitted the clusterers on other
    features and restarted the head, against docs/ssl.md's promise of a refusal. Another seed draws other
    ks: the refusal names the seed, not only the ks."""
    import json

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainerCPU

    for key, env_value in workspace["env"].items():
        monkeypatch.setenv(key, env_value)
    pre = workspace["base"] / "pre" / f"Dataset{PRETRAIN}_SSLPretrain"
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    checkpoint = workspace["fold"] / "checkpoint_final.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["ssl"]["bank_config"][setting]
    other = type("LoGoNetSSLTrainerOther", (LoGoNetSSLTrainerCPU,), {attribute: saved + 1})
    trainer = other({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=rf"other pseudo-label bank settings.*{setting} {saved} -> "
                                           rf"{saved + 1}.*Resume with the trainer that wrote it \({TRAINER}\)"):
        trainer.load_checkpoint(str(checkpoint))


@pytest.mark.e2e
def test_clusterers_are_fitted_on_slices_inside_the_cases(workspace, monkeypatch):
    """The phantom's 10-14-slice cases in a 12-slice patch: about 1 fitting slice in 10 used to be
    all-zero padding, a cluster spent on nothing. Padding is replaced by slices of further patches,
    so the count (and the head's ks) stays as planned."""
    import json

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainerCPU

    for key, env_value in workspace["env"].items():
        monkeypatch.setenv(key, env_value)
    pre = workspace["base"] / "pre" / f"Dataset{PRETRAIN}_SSLPretrain"
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    fitting = type("LoGoNetSSLTrainerFit", (LoGoNetSSLTrainerCPU,), {"cluster_fit_patches": 40})
    trainer = fitting({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json, torch.device("cpu"))
    trainer.initialize()
    rows = trainer._collect_fit_slices()
    assert rows.shape[0] == 40 * trainer._slices_per_patch()
    assert int((rows.abs().amax(1) == 0).sum()) == 0
    assert "padding slices (outside the cases) left out" in _log_text(Path(trainer.output_folder))


def test_pipeline_names_the_missing_source_plans(tmp_path):
    from nnunet_logonet.ssl.pipeline import PipelineError, prepare_pretraining_dataset

    (tmp_path / "raw" / "Dataset910_X" / "imagesTr").mkdir(parents=True)
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    with pytest.raises(PipelineError, match="LoGoNetTinyPlans.json does not exist: plan the source first"):
        prepare_pretraining_dataset(910, 911, PLANS, env=env, log=[].append)
    with pytest.raises(ValueError, match="must differ"):
        prepare_pretraining_dataset(910, 910, PLANS, env=env)
    assert not (tmp_path / "raw" / "Dataset911_Pretraining").exists()
    log = tmp_path / "logs" / "pretraining_dataset.log"  # a log file: an earlier attempt's output is kept
    log.parent.mkdir()
    log.write_text("[2/5] nnUNetv2_extract_fingerprint -d 911\nearlier attempt's output\n")
    with pytest.raises(PipelineError):
        prepare_pretraining_dataset(910, 911, PLANS, env=env, log=log)
    lines = log.read_text().splitlines()
    assert lines[:3] == ["[2/5] nnUNetv2_extract_fingerprint -d 911", "earlier attempt's output", ""]
    assert lines[3].startswith("# ") and datetime.fromisoformat(lines[3][2:]).tzinfo is not None


@pytest.mark.parametrize("configuration, reason", [("2d", "'2d' is not in plans"), ("3d_lowres", "is not in plans"),
                                                    ("3d_2d", "'3d_2d' is 2D in plans")])
def test_pipeline_checks_the_configuration_before_writing_anything(tmp_path, configuration, reason):
    import json

    from nnunet_logonet.ssl.pipeline import prepare_pretraining_dataset

    (tmp_path / "raw" / "Dataset910_X" / "imagesTr").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"patch_size": [12, 32, 32]}, "3d_2d": {"patch_size": [32, 32]}}}))
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    with pytest.raises(ValueError, match=reason) as error:
        prepare_pretraining_dataset(910, 911, PLANS, env=env, configuration=configuration, log=[].append)
    assert f"plans {PLANS} of Dataset910_X (they have: 3d_fullres, 3d_2d)" in str(error.value)
    assert "LoGoNet is a 3D network: pass -c 3d_fullres." in str(error.value)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset910_X"]
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["Dataset910_X"]


def test_pipeline_names_unreadable_source_plans(tmp_path):
    from nnunet_logonet.ssl.pipeline import PipelineError, prepare_pretraining_dataset

    (tmp_path / "raw" / "Dataset910_X" / "imagesTr").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text("{ truncated")
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    with pytest.raises(PipelineError, match=f"{PLANS}.json cannot be read as nnU-Net plans"):
        prepare_pretraining_dataset(910, 911, PLANS, env=env, log=[].append)


class _StopAtFingerprint(Exception):
    pass


def _stop_at_fingerprint(message: str) -> None:
    if "nnUNetv2_extract_fingerprint" in message:  # logged just before the command runs
        raise _StopAtFingerprint


@pytest.mark.parametrize("channels", [["T2", "ADC"], ["CT"]])
def test_pipeline_gives_the_image_only_dataset_the_source_channels(tmp_path, channels):
    """A 2-channel source (prostate MR) used to stop at step 1 asking for --channel-name, an option the
    pipeline lacks; the pre-training dataset now gets the source's channels, named as in its dataset.json."""
    import json

    import SimpleITK as sitk

    from nnunet_logonet.ssl.pipeline import prepare_pretraining_dataset

    source = tmp_path / "raw" / "Dataset910_X"
    (source / "imagesTr").mkdir(parents=True)
    for case in ("a", "b"):
        for channel in range(len(channels)):
            sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 8, 8), 100.0 * channel, np.float32)),
                            str(source / "imagesTr" / f"{case}_{channel:04d}.nii.gz"))
    (source / "dataset.json").write_text(json.dumps({"channel_names": dict(enumerate(channels)),
                                                     "labels": {"background": 0, "a": 1}, "numTraining": 2,
                                                     "file_ending": ".nii.gz"}))
    (tmp_path / "pre" / "Dataset910_X").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"patch_size": [4, 8, 8]}}}))
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    with pytest.raises(_StopAtFingerprint):
        prepare_pretraining_dataset(910, 911, PLANS, env=env, log=_stop_at_fingerprint)
    meta = json.loads((tmp_path / "raw" / "Dataset911_Pretraining" / "dataset.json").read_text())
    assert meta["channel_names"] == {str(i): name for i, name in enumerate(channels)}
    images = sorted(p.name for p in (tmp_path / "raw" / "Dataset911_Pretraining" / "imagesTr").iterdir())
    assert len(images) == 2 * len(channels) and images[1].endswith(f"_{len(channels) - 1:04d}.nii.gz")


def test_pipeline_names_the_source_dataset_json_when_its_channels_do_not_match_the_scans(tmp_path):
    import json

    import SimpleITK as sitk

    from nnunet_logonet.ssl.pipeline import PipelineError, prepare_pretraining_dataset

    source = tmp_path / "raw" / "Dataset910_X"
    (source / "imagesTr").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8, 8), np.float32)), str(source / "imagesTr" / "a_0000.nii.gz"))
    (tmp_path / "pre" / "Dataset910_X").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"patch_size": [4, 8, 8]}}}))
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}}))
    with pytest.raises(ValueError, match=r"2 --channel-name given for 1-channel cases.*T2, ADC from .*Dataset910_X/"
                                         r"dataset.json: the scans must have the same channels"):
        prepare_pretraining_dataset(910, 911, PLANS, env=env, log=[].append)
    (source / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    with pytest.raises(PipelineError, match=r"Dataset910_X/dataset.json has no valid channel_names"):
        prepare_pretraining_dataset(910, 911, PLANS, env=env, log=[].append)
    assert not (tmp_path / "raw" / "Dataset911_Pretraining").exists()


def test_trainer_checks_pretrained_weights_from_the_command_line_before_loading(tmp_path):
    """LoGoNetTrainer.initialize reads -pretrained_weights from nnUNetv2_train's argv and lists
    every mismatch before nnU-Net's loader runs."""
    from types import SimpleNamespace

    from nnunet_logonet.training.trainer import LoGoNetTrainer

    other = LoGoNet.from_preset("tiny", 1, 3, (32, 64, 64), dims=[8, 16, 32, 48])
    torch.save({"network_weights": other.state_dict()}, tmp_path / "other.pth")
    fake = SimpleNamespace(network=LoGoNet.from_preset("tiny", 1, 3, (32, 64, 64)),
                           plans_manager=SimpleNamespace(plans_name="LoGoNetTinyPlans"), configuration_name="3d_fullres")
    argv = ["nnUNetv2_train", "1", "3d_fullres", "0", "-pretrained_weights", str(tmp_path / "other.pth")]
    with pytest.raises(PretrainedMismatchError, match=r"shape differs") as error:
        LoGoNetTrainer.check_pretrained_weights(fake, argv)
    assert "LoGoNetTinyPlans" in str(error.value) and "other.pth" in str(error.value)
    torch.save({"network_weights": fake.network.state_dict()}, tmp_path / "same.pth")
    LoGoNetTrainer.check_pretrained_weights(fake, argv[:-1] + [str(tmp_path / "same.pth")])
    LoGoNetTrainer.check_pretrained_weights(fake, argv[:4])  # no -pretrained_weights: nothing to check


class _StopAtCommand(Exception):
    pass


def test_pipeline_redoes_a_fingerprint_and_plans_that_an_interrupted_run_cut_short(tmp_path):
    """nnU-Net writes its fingerprint and plans in place; a file cut short used to stop the pipeline with a
    bare JSON error on every rerun. Each is now made again (the fingerprint with --clean)."""
    import json

    import SimpleITK as sitk

    from nnunet_logonet.ssl.pipeline import prepare_pretraining_dataset

    source = tmp_path / "raw" / "Dataset910_X"
    (source / "imagesTr").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8, 8), np.float32)), str(source / "imagesTr" / "a_0000.nii.gz"))
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    (tmp_path / "pre" / "Dataset910_X").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset910_X" / f"{PLANS}.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"patch_size": [4, 8, 8]}}}))
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}

    def run_until(command):
        messages = []

        def log(message):
            messages.append(message)
            if command in message:
                raise _StopAtCommand

        with pytest.raises(_StopAtCommand):
            prepare_pretraining_dataset(910, 911, PLANS, env=env, log=log)
        return messages

    target = tmp_path / "pre" / "Dataset911_Pretraining"
    run_until("nnUNetv2_extract_fingerprint")  # step 1 done
    target.mkdir(parents=True)
    (target / "dataset_fingerprint.json").write_text('{"spacings": [[1.0, 1.0')
    messages = run_until("nnUNetv2_extract_fingerprint")
    assert any("dataset_fingerprint.json is not valid JSON" in m for m in messages)
    assert messages[-1].endswith("--clean")
    (target / "dataset_fingerprint.json").write_text("{}")
    (target / f"{PLANS}.json").write_text('{"configurations": {"3d_f')
    messages = run_until("nnUNetv2_move_plans_between_datasets")
    assert any(f"{PLANS}.json is not valid JSON" in m and "moving the plans again" in m for m in messages)


def test_pseudo_labels_come_from_the_unmasked_batch_and_the_network_sees_the_masked_one():
    """The pretext task: predict, for each masked slice, the cluster of the clean slice. Labels taken from the
    masked batch give every zeroed slice the same cluster, and the task becomes spotting the mask (the
    learning test still passes then: above-chance accuracy is easy either way)."""
    from types import SimpleNamespace

    from nnunet_logonet.ssl.masking import SliceSequenceMasker
    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer

    torch.manual_seed(0)
    batch, slices, ks = 2, 12, (3, 4)
    data = torch.randn(batch, 1, slices, 16, 16) + 5  # no voxel is 0 before masking
    seen = {}
    trainer = object.__new__(LoGoNetSSLTrainer)
    trainer.device, trainer.ssl_tau = torch.device("cpu"), 0.1
    trainer.masker = SliceSequenceMasker(phi1=0.3, phi2=1.0, slice_axis=2)
    trainer._labels = lambda x: (seen.setdefault("labelled", x.clone()),
                                 torch.zeros(batch, slices, len(ks), dtype=torch.long))[1]
    trainer.network = lambda x: seen.setdefault("network", x.clone())
    trainer._tap = SimpleNamespace(pop=lambda: None)
    trainer._head_call = lambda features: torch.randn(batch, slices, sum(ks), requires_grad=True)
    trainer.ssl_head = SimpleNamespace(ks=ks)
    loss, _ = trainer.pretext_loss(data)
    assert torch.equal(seen["labelled"], data)
    assert (seen["network"] == 0).any() and not (data == 0).any()
    assert torch.isfinite(loss)


@pytest.mark.e2e
def test_pipeline_command_takes_msd_named_scans_from_another_folder(workspace, tmp_path):
    """docs/msd.md step 3: `python -m nnunet_logonet.ssl.pipeline -s 9 -t 509 -p LoGoNetPlans -i
    $MSD/Task09_Spleen/imagesTs`: MSD test images carry no _0000 and end in a case number that is no channel.
    The steps it prints are the commands it runs, quoted so that they work pasted (a folder with a space here)."""
    import json
    import shlex
    import shutil

    base, env = workspace["base"], workspace["env"]
    unlabeled = sorted((base / "raw" / f"Dataset{LABELED}_SSLPhantom" / "imagesUnlabeled").glob("*.nii.gz"))
    scans = tmp_path / "MSD scans" / "imagesTs"
    scans.mkdir(parents=True)
    for scan, name in zip(unlabeled, ("spleen_1.nii.gz", "spleen_12.nii.gz")):
        shutil.copyfile(scan, scans / name)
    proc = subprocess.run([sys.executable, "-m", "nnunet_logonet.ssl.pipeline", "-s", str(LABELED), "-t", "912",
                           "-p", PLANS, "-i", str(scans), "--name", "SpleenUnlabeled", "--no-source-images",
                           "--no-source-unlabeled"], env={**os.environ, **env, "nnUNet_n_proc_DA": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Dataset912_SpleenUnlabeled (2 cases)" in proc.stdout
    assert f"[1/5] logonet_prepare_unlabeled -i {shlex.quote(str(scans))} -d 912 --name SpleenUnlabeled" in proc.stdout
    assert f"nnUNetv2_train 912 3d_fullres all -tr LoGoNetSSLTrainer -p {PLANS}" in proc.stdout
    images = base / "raw" / "Dataset912_SpleenUnlabeled" / "imagesTr"
    assert sorted(p.name for p in images.iterdir()) == ["spleen_12_0000.nii.gz", "spleen_1_0000.nii.gz"]
    source = json.loads((base / "pre" / f"Dataset{LABELED}_SSLPhantom" / f"{PLANS}.json").read_text())
    data = base / "pre" / "Dataset912_SpleenUnlabeled" / source["configurations"]["3d_fullres"]["data_identifier"]
    assert sorted(p.stem for p in data.glob("*.pkl")) == ["spleen_1", "spleen_12"]


# ------------------------------------------------------------- the SSL trainer's resume and epoch logic, in-process
def _bare_ssl_trainer(tmp_path):
    """A LoGoNetSSLTrainer with only what its resume and epoch-end logic read (nnU-Net's constructor,
    data and network left out): a small bank over 24-feature slices and a head with its optimiser."""
    from nnunet_logonet.ssl.head import SlicePseudoLabelHead
    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer

    trainer = object.__new__(LoGoNetSSLTrainer)
    trainer.output_folder = str(tmp_path)
    trainer.cluster_num, trainer.cluster_k_range, trainer.cluster_sample_fraction = 2, (3, 5), 0.5
    trainer.cluster_max_iter = 20
    trainer._feature_dim = lambda: 24
    trainer._head_reset, trainer._resume_digest, trainer.is_ddp = False, None, False
    trainer.messages = []
    trainer.print_to_log_file = lambda *args, **kwargs: trainer.messages.append(" ".join(map(str, args)))
    rng = np.random.default_rng(0)
    banks = [trainer._new_bank().fit(rng.normal(size=(200, 24)).astype(np.float32)) for _ in range(2)]
    assert banks[0].ks == banks[1].ks  # the same settings fitted on other slices: other centroids, same ks
    trainer.ssl_head = SlicePseudoLabelHead(4, banks[0].ks, grid=1, hidden=8)
    trainer.optimizer = torch.optim.AdamW(trainer.ssl_head.parameters(), lr=1e-3)
    trainer.ssl_head(torch.randn(1, 4, 3, 2, 2)).sum().backward()
    trainer.optimizer.step()  # Adam moments for every head parameter
    return trainer, banks


def test_resume_refits_a_cluster_cache_that_is_not_the_checkpoints_bank(tmp_path):
    """--c with a cache of the same settings but other centroids (overwritten by another run): reused, the head
    would be trained on other pseudo-labels than it learned. The seeded refit gives the checkpoint's bank back."""
    from nnunet_logonet.training.ssl_trainer import bank_digest

    trainer, (checkpoints, other) = _bare_ssl_trainer(tmp_path)
    trainer._resume_digest = bank_digest(checkpoints)
    other.save(trainer.cluster_cache)
    trainer._fit_bank = lambda: checkpoints
    bank = trainer._load_or_fit_bank()
    assert bank_digest(bank) == bank_digest(checkpoints)
    assert any("digest differs" in m for m in trainer.messages)
    assert any("equal the checkpoint's" in m for m in trainer.messages) and not trainer._head_reset
    assert bank_digest(SliceClusterBank.load(trainer.cluster_cache)) == bank_digest(checkpoints)


def test_resume_whose_refit_differs_restarts_the_head_and_its_moments(tmp_path):
    """The refitted clusters are other classes: the head's weights and Adam moments for the old ones are noise."""
    from nnunet_logonet.training.ssl_trainer import bank_digest

    trainer, (checkpoints, refitted) = _bare_ssl_trainer(tmp_path)
    trainer._resume_digest = bank_digest(checkpoints)  # no cache file: refitted
    trainer._fit_bank = lambda: refitted
    with torch.no_grad():
        for parameter in trainer.ssl_head.parameters():
            parameter.fill_(2.0)  # what training left, in every parameter (the LayerNorm's too)
    trainer._load_or_fit_bank()
    assert trainer._head_reset and any("restarts from random weights" in m for m in trainer.messages)
    assert not any(bool((p == 2).any()) for p in trainer.ssl_head.parameters())
    assert not any(p in trainer.optimizer.state for p in trainer.ssl_head.parameters())


def _ssl_epoch_end_trainer(tmp_path, num_epochs):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    trainer, _ = _bare_ssl_trainer(tmp_path)
    trainer.logger = MetaLogger(str(tmp_path), False)
    trainer._ensure_log_keys()
    trainer.current_epoch, trainer.num_epochs, trainer.save_every, trainer.local_rank = 0, num_epochs, 2, 1
    trainer._best_ema, trainer._epoch_label_seconds = None, 0.0
    trainer._timing = {"fit_seconds": 0.0, "label_seconds": 0.0, "pretrain_seconds": 0.0}
    trainer.saved = []
    trainer.save_checkpoint = lambda path: trainer.saved.append((trainer.current_epoch, Path(path).name))
    return trainer


def test_checkpoint_best_follows_the_rising_ema_of_the_pseudo_label_accuracy(tmp_path):
    """nnU-Net picks checkpoint_best by the EMA of its Dice slot, which the SSL trainer fills with the
    validation pseudo-label accuracy; checkpoint_latest every save_every epochs, not at the last (final)."""
    trainer = _ssl_epoch_end_trainer(tmp_path, num_epochs=4)
    for epoch, accuracy in enumerate([0.2, 0.1, 0.1, 0.9]):  # EMA 0.2, 0.19, 0.181, 0.2529
        trainer.logger.log("epoch_start_timestamps", float(epoch), epoch)
        trainer.on_train_epoch_end([{"loss": np.float32(1.0), "accuracy": np.float32(accuracy)}])
        trainer.on_validation_epoch_end([{"loss": np.float32(1.0), "accuracy": np.float32(accuracy)}])
        trainer.on_epoch_end()
    assert trainer.saved == [(0, "checkpoint_best.pth"), (1, "checkpoint_latest.pth"), (3, "checkpoint_best.pth")]


def test_batches_without_masked_slices_leave_the_epoch_means_alone(tmp_path):
    """A batch with no masked slice has loss 0 and accuracy NaN: logged as such it would pull the epoch's
    loss toward 0 and its NaN would poison nnU-Net's EMA, which picks checkpoint_best."""
    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer

    empty = LoGoNetSSLTrainer._step_output(torch.tensor(0.0), torch.tensor(float("nan")))
    assert np.isnan(empty["loss"]) and np.isnan(empty["accuracy"])
    full = LoGoNetSSLTrainer._step_output(torch.tensor(2.0), torch.tensor(0.25))
    assert (float(full["loss"]), float(full["accuracy"])) == (2.0, 0.25)
    trainer = _ssl_epoch_end_trainer(tmp_path, num_epochs=2)
    trainer.logger.log("epoch_start_timestamps", 0.0, 0)
    trainer.on_train_epoch_end([full, empty])
    assert trainer.logger.get_value("train_losses", step=0) == 2.0
    assert trainer.logger.get_value("ssl_train_accuracy", step=0) == 0.25
    trainer.on_validation_epoch_end([empty, empty])  # no masked slice in the whole validation
    assert trainer.logger.get_value("mean_fg_dice", step=0) == 0.0
    assert trainer.logger.get_value("ema_fg_dice", step=0) == 0.0
    trainer.on_epoch_end()  # the log says why there is no validation figure, instead of "nan" or 0.0
    assert "train_loss 2.0000" in trainer.messages
    assert "val_loss n/a (no masked slice in this epoch's validation batches)" in trainer.messages
    (line,) = [m for m in trainer.messages if m.startswith("pseudo-label accuracy")]
    assert line.startswith("pseudo-label accuracy: train 0.2500, val n/a (no masked slice in this epoch's "
                           "validation batches) (chance ")


def test_validation_runs_the_head_in_eval_mode(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer, _ = _bare_ssl_trainer(tmp_path)
    monkeypatch.setattr(nnUNetTrainer, "on_validation_epoch_start", lambda self: None)
    trainer.ssl_head.train()
    trainer.on_validation_epoch_start()
    assert not trainer.ssl_head.training


def _checkpointing_ssl_trainer(tmp_path):
    """A bare SSL trainer (as above) with a tiny LoGoNet, its feature tap, an optimiser over both and a logger."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from nnunet_logonet.ssl.head import SlicePseudoLabelHead

    trainer, banks = _bare_ssl_trainer(tmp_path)
    trainer.network = tiny_logonet()
    trainer._tap = PreClassifierFeatures(trainer.network)
    trainer.ssl_head = SlicePseudoLabelHead(trainer._tap.channels, banks[0].ks)
    trainer.optimizer = torch.optim.AdamW([*trainer.network.parameters(), *trainer.ssl_head.parameters()], lr=1e-3)
    trainer.logger = MetaLogger(str(tmp_path), False)
    trainer._ensure_log_keys()
    trainer.bank, trainer.grad_scaler, trainer.device = banks[0], None, torch.device("cpu")
    trainer.local_rank, trainer.disable_checkpointing, trainer.was_initialized = 0, False, True
    trainer.current_epoch, trainer._best_ema, trainer.my_init_kwargs = 0, None, {"fold": "all"}
    trainer.inference_allowed_mirroring_axes = (0, 1, 2)
    trainer._timing = {"fit_seconds": 0.0, "label_seconds": 0.0, "pretrain_seconds": 0.0}
    return trainer


def test_ssl_checkpoint_round_trip_resumes_epoch_head_bank_and_costs(tmp_path):
    """--c: the next epoch, the head's weights, the bank it was trained with and the time spent so far (the
    cost line of the log would undercount otherwise); the classifiers are not in the file (the pretext never
    trained them, and nnU-Net's -pretrained_weights skips them)."""
    from nnunet_logonet.training.ssl_trainer import bank_digest

    saving = _checkpointing_ssl_trainer(tmp_path / "a")
    saving.current_epoch, saving._best_ema = 6, 0.3
    saving._timing.update(fit_seconds=12.5, label_seconds=3.25, pretrain_seconds=100.0)
    saving.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert not any(".seg_layers." in key for key in checkpoint["network_weights"])

    resuming = _checkpointing_ssl_trainer(tmp_path / "b")
    resuming.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert resuming.current_epoch == 7 and resuming._best_ema == 0.3
    assert resuming._timing == {"fit_seconds": 12.5, "label_seconds": 3.25, "pretrain_seconds": 100.0}
    assert resuming._resume_digest == bank_digest(saving.bank)
    for key, value in saving.ssl_head.state_dict().items():
        assert torch.equal(resuming.ssl_head.state_dict()[key], value)

    del checkpoint["network_weights"]["head.conv.weight"]  # other plans' network, or a file cut by hand
    with pytest.raises(RuntimeError, match=r"does not fit this network: missing \['head.conv.weight'\]"):
        _checkpointing_ssl_trainer(tmp_path / "c").load_checkpoint(checkpoint)


def test_pretraining_schedule_and_fitting_sizes(tmp_path):
    """Warm-up over 5 % of the epochs (at least one epoch: at 2 epochs 5 % rounds to none, and the first
    epoch would run at the full rate); enough patches for the wanted slices (rounded up); the slice features
    of odd in-plane sizes pooled with the edge cells kept (as the bank pools them); each head k reduced to the
    number of fitting slices, as the bank reduces it."""
    from types import SimpleNamespace

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer

    assert LoGoNetSSLTrainer.ssl_warmup_fraction == 0.05
    trainer, _ = _bare_ssl_trainer(tmp_path)
    trainer._feature_dim = LoGoNetSSLTrainer._feature_dim.__get__(trainer)
    trainer.num_epochs, trainer.initial_lr, trainer.weight_decay, trainer.device = 2, 1e-4, 1e-5, torch.device("cpu")
    trainer.network = tiny_logonet()
    trainer.configuration_manager = SimpleNamespace(patch_size=[12, 33, 31])
    trainer.num_input_channels, trainer.cluster_pool = 1, 2
    trainer.cluster_fit_patches, trainer.cluster_samples_per_cluster = None, 8
    _, scheduler = trainer.configure_optimizers()
    assert scheduler.warmup_steps == 1
    # 8 slices per cluster x k 5 / sample fraction 0.5 = 80 slices, 12 per patch: 6.67 -> 7 patches
    assert trainer.fit_patch_count == 7
    assert trainer._feature_dim() == 17 * 16  # ceil(33 / 2) x ceil(31 / 2)
    assert SliceClusterBank(pool=2).slice_features(torch.zeros(1, 1, 12, 33, 31)).shape[-1] == 17 * 16
    trainer.cluster_fit_patches = 1
    trainer.cluster_k_range = (20, 30)  # more than the 12 slices of one patch
    assert trainer._expected_ks() == (12, 12)


def test_fitting_slices_are_cropped_with_a_seed_and_training_randomness_is_left_as_it_was(tmp_path, monkeypatch):
    """nnU-Net's loader draws from numpy's global generator: the fit seeds it (same slices, same bank) and
    must put the training's state back, or every seeded run would crop other training patches."""
    from types import SimpleNamespace

    import nnunet_logonet.training.ssl_trainer as ssl_trainer_module

    trainer, _ = _bare_ssl_trainer(tmp_path)
    trainer.configuration_manager = SimpleNamespace(patch_size=[4, 8, 8])
    trainer.cluster_fit_patches, trainer.cluster_seed, trainer.local_rank = 2, 0, 1
    trainer.do_split = lambda: (["a"], [])
    trainer.dataset_class = lambda *args, **kwargs: None
    trainer.preprocessed_dataset_folder, trainer.folder_with_segs_from_previous_stage = "", None
    trainer.label_manager, trainer.oversample_foreground_percent = None, 0.33

    class Loader:  # one random patch per draw, from numpy's global generator, as nnU-Net's loader
        def __init__(self, *args, **kwargs):
            pass

        def __next__(self):
            return {"data": torch.from_numpy(np.random.rand(1, 1, 4, 8, 8)).float(),
                    "target": torch.zeros(1, 1, 4, 8, 8)}

    monkeypatch.setattr(ssl_trainer_module, "nnUNetDataLoader", Loader)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = trainer._collect_fit_slices()
    assert np.random.rand() == expected_next
    assert torch.equal(first, trainer._collect_fit_slices())
