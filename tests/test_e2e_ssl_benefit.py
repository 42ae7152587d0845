"""``python -m nnunet_logonet.benchmark.ssl_benefit`` end to end (slow: ~3 min on 2 cores).

The benchmark docs/ssl.md and README quote for "does pre-training help?": phantom -> nnU-Net's planning
-> the image-only pre-training dataset -> ``LoGoNetSSLTrainer`` pre-training -> fine-tuning from scratch
and from the SSL weights -> ``nnUNetv2_predict`` on imagesTs -> nnU-Net's evaluator, every step through
nnU-Net's commands. Its own budgets (demoQuick: minutes per arm) are swapped for one short epoch per
training here; everything else runs as the command does. A second run reuses every result.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest


SSL_TRAINER, FT_TRAINER = "LoGoNetSSLTrainer_ciBenefit", "LoGoNetTrainer_ciBenefitNoVal"
#: written by the benchmark into its own nnUNet_extTrainer folder, as its real module is
EXT_MODULE = textwrap.dedent(f'''
    from nnunet_logonet.benchmark.ssl_benefit import LoGoNetTrainer_demoQuickNoVal
    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer_demoQuick
    from nnunet_logonet.training.trainer import with_budget


    class _FewerPatches(LoGoNetSSLTrainer_demoQuick):
        cluster_fit_patches = 20


    # the benchmark's --quick trainers (its own fine-tuning class: no final validation), shorter
    {SSL_TRAINER} = with_budget(_FewerPatches, "{SSL_TRAINER}", 1, 3, 1, __name__)
    {FT_TRAINER} = with_budget(LoGoNetTrainer_demoQuickNoVal, "{FT_TRAINER}", 1, 4, 1, __name__)
''')
ARGS = ["--quick", "--labeled", "2", "--unlabeled", "2", "--test", "2", "--size", "32", "--device", "cpu",
        "--dataset-id", "940"]


@pytest.mark.slow
@pytest.mark.e2e
def test_ssl_benefit_runs_both_arms_through_nnunet_and_reuses_its_results(tmp_path, monkeypatch, capsys):
    from nnunet_logonet.benchmark import ssl_benefit

    monkeypatch.setattr(ssl_benefit, "BUDGETS", {True: (SSL_TRAINER, FT_TRAINER), False: (SSL_TRAINER, FT_TRAINER)})
    monkeypatch.setattr(ssl_benefit, "EXT_MODULE", EXT_MODULE)
    # the user's nnU-Net folders are never touched: the benchmark sets its own under --base
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / "users" / name))
    base = tmp_path / "work"
    assert ssl_benefit.main([*ARGS, "--base", str(base)]) == 0
    report = json.loads((base / "ssl_benefit.json").read_text())
    printed = capsys.readouterr().out
    assert (base / "ssl_benefit.png").read_bytes()[:4] == b"\x89PNG" and f"chart: {base / 'ssl_benefit.png'}" in printed
    assert not (tmp_path / "users").exists()

    steps = [c["step"] for c in report["commands"]]
    assert steps == ["plan", "pretrain", "finetune_scratch_0", "predict_scratch_0", "finetune_ssl_0", "predict_ssl_0"]
    commands = {c["step"]: c["command"] for c in report["commands"]}
    assert all(c["seconds"] > 0 and c["cpu_seconds"] > 0 and c["peak_rss_mb"] > 100 for c in report["commands"])
    ssl_checkpoint = (base / "nnUNet_results" / "Dataset941_SSLBenefitPretrain" /
                      f"{SSL_TRAINER}__LoGoNetTinyPlans__3d_fullres" / "fold_all" / "checkpoint_final.pth")
    assert ssl_checkpoint.is_file()
    assert f"-pretrained_weights {ssl_checkpoint}" in commands["finetune_ssl_0"]
    assert "-pretrained_weights" not in commands["finetune_scratch_0"]
    assert "Loading pretrained weights" in (base / "logs" / "finetune_ssl_0.log").read_text()  # nnU-Net's loader
    assert report["settings"]["pretraining_trainer"] == SSL_TRAINER and report["settings"]["labeled"] == 2

    pre = report["pretraining"]
    assert len(pre["train_loss"]) == 1 and pre["num_clusterers"] == 12 and pre["k_range"][1] <= 64
    assert 0 < pre["chance_accuracy"] < 0.1 and 0 < pre["clustering_share"] < 1

    labels = json.loads((base / "nnUNet_raw" / "Dataset940_SSLBenefit" / "dataset.json").read_text())["labels"]
    organs = [name for name, value in labels.items() if value != 0]
    for arm in ("scratch", "ssl"):
        (run,) = report["arms"][arm]
        assert 0 <= run["test_dice"] <= 1 and sorted(run["per_organ_dice"]) == sorted(organs)
        assert Path(run["checkpoint"]).is_file() and run["finetune_seconds"] > 0
        predictions = sorted(p.name for p in (base / f"predictions_{arm}_0").glob("*.nii.gz"))
        assert predictions == ["SSLBenefit_ts000.nii.gz", "SSLBenefit_ts001.nii.gz"]
        assert report["mean_test_dice"][arm] == run["test_dice"]
        # the fine-tuning's log says why nnU-Net's final validation is left out
        fold = Path(run["checkpoint"]).parent
        log = "\n".join(p.read_text() for p in fold.glob("training_log_*.txt"))
        assert "nnU-Net's validation on the training cases is skipped" in log
        assert not (fold / "validation").exists()
    assert "test Dice (foreground mean)" in printed and f"mean: scratch {report['mean_test_dice']['scratch']:.4f}" in printed

    # run again: every result is found and reused, nothing is trained or predicted twice
    assert ssl_benefit.main([*ARGS, "--base", str(base), "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["commands"] == [] and again["mean_test_dice"] == report["mean_test_dice"]
    assert all(run["finetune_seconds"] is None for runs in again["arms"].values() for run in runs)

    # a fine-tuning an interrupted run left without its final checkpoint is continued with nnU-Net's --c
    # (which nnU-Net refuses beside -pretrained_weights: the checkpoint holds the fine-tuned weights), then
    # its test cases are predicted again
    fold = Path(report["arms"]["ssl"][0]["checkpoint"]).parent
    (fold / "checkpoint_final.pth").unlink()
    assert (fold / "checkpoint_best.pth").is_file()
    assert ssl_benefit.main([*ARGS, "--base", str(base), "--output", str(tmp_path / "resumed.json")]) == 0
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [c["step"] for c in resumed["commands"]] == ["finetune_ssl_0", "predict_ssl_0"]
    assert resumed["commands"][0]["command"].endswith(" --c") and "-pretrained_weights" not in resumed["commands"][0]["command"]
    assert (fold / "checkpoint_final.pth").is_file()
    # the log keeps every attempt, each under its own header (demo/runner.py): the resumed one loads no weights
    attempts = (base / "logs" / "finetune_ssl_0.log").read_text().split("\n$ ")
    assert len(attempts) == 3 and "Loading pretrained weights" in attempts[1]
    assert attempts[-1].split("\n", 1)[0].endswith(" --c") and "Loading pretrained weights" not in attempts[-1]

    # a summary a kill cut short (nnU-Net writes it in place) is made again, not read
    summary = base / "predictions_scratch_0" / "summary.json"
    summary.write_text(summary.read_text()[:100])
    assert ssl_benefit.main([*ARGS, "--base", str(base), "--output", str(tmp_path / "summary.json")]) == 0
    assert [c["step"] for c in json.loads((tmp_path / "summary.json").read_text())["commands"]] == ["predict_scratch_0"]
    assert round(json.loads(summary.read_text())["foreground_mean"]["Dice"], 4) == report["mean_test_dice"]["scratch"]

    # pre-training redone (its checkpoint newer than the fine-tuning's): the SSL arm is fine-tuned again from it,
    # not reused nor continued; the scratch arm is kept
    later = (fold / "checkpoint_final.pth").stat().st_mtime + 60
    os.utime(ssl_checkpoint, (later, later))
    assert ssl_benefit.main([*ARGS, "--base", str(base), "--output", str(tmp_path / "redone.json")]) == 0
    redone = json.loads((tmp_path / "redone.json").read_text())
    assert [c["step"] for c in redone["commands"]] == ["finetune_ssl_0", "predict_ssl_0"]
    assert f"-pretrained_weights {ssl_checkpoint}" in redone["commands"][0]["command"]
    assert " --c" not in redone["commands"][0]["command"]
    assert "fine-tuned from an earlier pre-training: fine-tuning again" in capsys.readouterr().out

    # other data settings are refused: the folder's phantom and models were made with these
    assert ssl_benefit.main([*ARGS, "--base", str(base), "--seed", "5", "--output", str(tmp_path / "no.json")]) == 1
    assert "--seed 5 (was 0)" in capsys.readouterr().err and not (tmp_path / "no.json").exists()


@pytest.mark.parametrize("flags, said", [
    (["--labeled", "0"], "--labeled must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--dataset-id", "999"], "--dataset-id must be in [1, 998]"),
    (["--size", "16"], "--size must be in [32, 512], got 16"),  # the phantom's limit
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_ssl_benefit_refuses_bad_settings_before_writing_anything(tmp_path, capsys, flags, said):
    from nnunet_logonet.benchmark import ssl_benefit

    with pytest.raises(SystemExit) as stop:
        ssl_benefit.main([*flags, "--base", str(tmp_path / "work")])
    assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_ssl_benefit_failed_step_is_one_message_naming_its_log(tmp_path, capsys, monkeypatch):
    """A step nnU-Net refuses (here planning, on a dataset folder that is not a phantom) ends the
    command with the step, its command line, exit code, log and the log's last lines; no traceback, no report."""
    from nnunet_logonet.benchmark import ssl_benefit

    base = tmp_path / "work"
    ssl_benefit.open_work_folder(ssl_benefit.build_parser().parse_args([*ARGS, "--base", str(base)]))
    dataset = base / "nnUNet_raw" / "Dataset940_SSLBenefit"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "dataset.json").write_text("{not json")
    assert ssl_benefit.main([*ARGS, "--base", str(base)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssl_benefit: error: plan: `") and "logonet_plan_and_preprocess -d 940" in err
    assert "failed (exit 2)" in err and f"Last lines of {base / 'logs' / 'plan.log'}" in err
    assert "dataset.json" in err  # the planner's own message, from the log's tail
    assert not (base / "ssl_benefit.json").exists()


@pytest.mark.parametrize("fresh", [True, False])
def test_ssl_benefit_uses_and_deletes_only_a_folder_it_made(tmp_path, capsys, fresh):
    """``--fresh --base .`` once meant ``rm -rf .``, and a folder of unknown settings was reported as this run's:
    a non-empty folder without the command's marker is refused and kept whole, with or without --fresh."""
    from nnunet_logonet.benchmark import ssl_benefit

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert ssl_benefit.main([*ARGS, "--base", str(mine), *(["--fresh"] if fresh else [])]) == 1
    err = capsys.readouterr().err
    said = "--fresh would delete" if fresh else "--base is"
    assert f"{said} {mine}, which holds files but no .ssl_benefit marker: ssl_benefit did not make it" in err
    assert "Choose another --base" in err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_ssl_benefit_refuses_a_folder_made_with_other_data_settings(tmp_path, capsys):
    """A rerun reuses the phantom, models and predictions it finds; under other settings it would report them as
    the new ones. The folder's marker records the settings; a change is named with the way out."""
    from nnunet_logonet.benchmark import ssl_benefit

    base = tmp_path / "work"
    args = ssl_benefit.build_parser().parse_args([*ARGS, "--base", str(base)])  # ARGS give every data setting
    assert ssl_benefit.open_work_folder(args) == base.resolve()
    recorded = json.loads((base / ".ssl_benefit").read_text())
    assert recorded == {"dataset_id": 940, "labeled": 2, "unlabeled": 2, "test": 2, "size": 32, "seed": 0}
    (base / "kept").write_text("x")
    assert ssl_benefit.open_work_folder(args) == base.resolve() and (base / "kept").exists()  # same settings: reused

    assert ssl_benefit.main([*ARGS, "--base", str(base), "--labeled", "3", "--size", "48"]) == 1
    err = capsys.readouterr().err
    assert "holds results made with other settings: --labeled 3 (was 2), --size 48 (was 32)" in err
    assert "Add --fresh to start over there, or give another --base" in err
    assert (base / "kept").exists() and json.loads((base / ".ssl_benefit").read_text()) == recorded

    fresh = ssl_benefit.build_parser().parse_args([*ARGS, "--base", str(base), "--labeled", "3", "--fresh"])
    ssl_benefit.open_work_folder(fresh)  # its own folder: emptied, the new settings recorded
    assert sorted(p.name for p in base.iterdir()) == [".ssl_benefit"]
    assert json.loads((base / ".ssl_benefit").read_text())["labeled"] == 3


def test_ssl_benefit_interrupted_says_how_to_continue(tmp_path, capsys, monkeypatch):
    from nnunet_logonet.benchmark import ssl_benefit

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ssl_benefit, "run", interrupted)
    assert ssl_benefit.main(["--base", str(tmp_path / "work")]) == 130
    assert "interrupted. Run the same command again (same --base, without --fresh)" in capsys.readouterr().err
