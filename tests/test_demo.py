"""logonet_demo: table and figures from results, stage reuse, bad input, and the quick run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from nnunet_logonet.demo import cli, report, stages
from nnunet_logonet.demo.cli import check_dataset_ids, demo_environment, main, run_demo, run_stages
from nnunet_logonet.demo.runner import run_command
from nnunet_logonet.demo.settings import DemoError, DemoSettings, make_settings
from nnunet_logonet.demo.stages import DemoContext, Stage, epoch_seconds, seconds_per_case, seconds_per_iteration
from nnunet_logonet.demo.state import DemoState, mark

ORGANS = ["spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "aorta"]
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
MARKER = ".logonet_demo"  # what the demo leaves in each dataset folder it makes


def synthetic_results(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    settings = make_settings(quick=True)
    models = {}
    for model in settings.models:
        dice = {o: float(rng.uniform(0, 1)) for o in ORGANS}
        models[model.key] = {"label": model.label, "dice": dice, "mean_dice": float(np.mean(list(dice.values()))),
                             "parameters": int(rng.integers(1e5, 3e7)), "macs": int(rng.integers(1e8, 1e11)),
                             "patch_size": [16, 32, 32], "seconds_per_case": float(rng.uniform(0.1, 5)),
                             "seconds_per_iteration": float(rng.uniform(0.1, 3)),
                             "peak_memory_mb": float(rng.uniform(500, 3000)), "peak_memory_source": "max RSS"}
    models["logonet"]["dice"]["gallbladder"] = None  # a value nnU-Net could not compute
    return {"settings": settings.as_dict(), "organs": ORGANS, "models": models, "tta": False,
            "machine": {"cpu_count": 2, "load_average_start": [1.0, 1.0, 1.0]}, "wall_s": 100.0}


# ------------------------------------------------------------------------------ table
def test_table_has_one_row_per_model_with_its_numbers():
    results = synthetic_results()
    lines = report.format_table(results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[1:7] == [o.replace("_", " ") for o in ORGANS]
    assert "mean Dice" in header and "GMACs" in header and "s/train iter" in header
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[2:]}
    assert len(rows) == 3
    for model in results["models"].values():
        row = rows[model["label"]]
        assert row[header.index("spleen")] == f"{model['dice']['spleen']:.3f}"
        assert row[header.index("mean Dice")] == f"{model['mean_dice']:.3f}"
        assert row[header.index("params (M)")] == f"{model['parameters'] / 1e6:.2f}"
        assert row[header.index("GMACs")] == f"{model['macs'] / 1e9:.2f}"
        assert row[header.index("peak mem (MB)")] == f"{model['peak_memory_mb']:.0f}"
    assert rows[results["models"]["logonet"]["label"]][header.index("gallbladder")] == "–"


def test_markdown_and_json_are_written(tmp_path):
    results = synthetic_results()
    report.write_markdown(results, tmp_path / "results.md")
    report.write_json({**results, "array": np.arange(3), "value": np.float32(0.5)}, tmp_path / "results.json")
    assert report.format_table(results) in (tmp_path / "results.md").read_text()
    assert "disable_tta" in (tmp_path / "results.md").read_text()
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["array"] == [0, 1, 2] and loaded["value"] == 0.5
    assert not list(tmp_path.glob(".*tmp*"))


def test_markdown_names_the_cpu_the_demo_ran_on(tmp_path):
    results = synthetic_results()
    results["machine"].update(cpu_model="AMD EPYC", cpu_family="25", cpu_model_number="17")
    report.write_markdown(results, tmp_path / "results.md")
    assert "2 CPU cores (AMD EPYC, family 25 model 17); load average" in (tmp_path / "results.md").read_text()
    del results["machine"]["cpu_model"]  # a results.json written before the demo recorded it
    report.write_markdown(results, tmp_path / "results.md")
    assert "2 CPU cores; load average" in (tmp_path / "results.md").read_text()


def test_markdown_adds_up_stage_times_when_stages_were_reused(tmp_path):
    results = synthetic_results()
    results["stages"] = {"a": {"reused": True, "stage_wall_s": 600.0}, "b": {"reused": False, "stage_wall_s": 60.0}}
    report.write_markdown(results, tmp_path / "results.md")
    assert "1 of 2 stages reused from an earlier run; the stages' own times add up to 11.0 min" in \
        (tmp_path / "results.md").read_text()


def test_markdown_lists_nnunet_ranking_best_first(tmp_path):
    results = synthetic_results()
    results["find_best_configuration"] = {"validation_dice": {"nnunet": 0.4, "logonet": 0.6, "logonet_ssl": 0.5},
                                          "best": "logonet"}
    report.write_markdown(results, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    labels = [results["models"][k]["label"] for k in ("logonet", "logonet_ssl", "nnunet")]
    positions = [text.index(f". {label}: ") for label in labels]
    assert positions == sorted(positions)
    assert f"1. {labels[0]}: 0.600 (best)" in text


def test_rank_parses_trainer_plans_pairs_and_reports_untrained_models(tmp_path, capsys, monkeypatch):
    import argparse

    from nnunet_logonet.demo import rank

    assert rank.parse_model("LoGoNetTrainer:LoGoNetTinyPlans") == {
        "plans": "LoGoNetTinyPlans", "configuration": "3d_fullres", "trainer": "LoGoNetTrainer"}
    for half in ("LoGoNetTrainer", "LoGoNetTrainer:", ":LoGoNetTinyPlans"):
        with pytest.raises(argparse.ArgumentTypeError, match="TRAINER:PLANS"):
            rank.parse_model(half)
    with pytest.raises(SystemExit):
        rank.main(["900", "LoGoNetTrainer"])
    assert "TRAINER:PLANS" in capsys.readouterr().err

    from nnunetv2.utilities import dataset_name_id_conversion

    def unknown(dataset):
        raise RuntimeError(f"Could not find a dataset with the ID {dataset}. ...")

    monkeypatch.setattr(dataset_name_id_conversion, "maybe_convert_to_dataset_name", unknown)
    assert rank.main(["999", "LoGoNetTrainer:LoGoNetTinyPlans"]) == 1
    err = capsys.readouterr().err  # no training helps there: nnU-Net's folders are the fix
    assert "ID 999" in err and 'eval "$(logonet_env)"' in err and "Train every model" not in err
    monkeypatch.setattr(dataset_name_id_conversion, "maybe_convert_to_dataset_name", lambda d: "Dataset900_Phantom")

    def untrained(*args, **kwargs):
        raise RuntimeError("Trained model ... does not have an output folder")

    monkeypatch.setattr(rank, "rank_models", untrained)
    assert rank.main(["900", "LoGoNetTrainer:LoGoNetTinyPlans"]) == 1
    err = capsys.readouterr().err
    assert "Train every model on folds [0]" in err and "--npz" not in err
    assert rank.main(["900", "LoGoNetTrainer:LoGoNetTinyPlans", "-f", "0", "1", "--ensembling"]) == 1
    err = capsys.readouterr().err  # ensembling reads the validation probabilities: --npz, or --val --npz after
    assert "Train every model on folds [0, 1]" in err and "-tr TRAINER -p PLANS --npz" in err and "--val --npz" in err

    def no_validation_files(*args, **kwargs):  # nnU-Net reads a fold's validation summary that is not there
        raise FileNotFoundError("[Errno 2] No such file or directory: '.../fold_1/validation/summary.json'")

    monkeypatch.setattr(rank, "rank_models", no_validation_files)
    assert rank.main(["900", "LoGoNetTrainer:LoGoNetTinyPlans", "-f", "0", "1"]) == 1
    err = capsys.readouterr().err
    assert "fold_1/validation/summary.json" in err and "Train every model on folds [0, 1]" in err


def test_rank_asks_nnunet_to_stop_at_a_missing_fold(monkeypatch):
    """With strict=False nnU-Net skips folds that were not trained and ranks on the rest, silently."""
    from nnunetv2.evaluation import find_best_configuration as nnunet_selection

    from nnunet_logonet.demo import rank

    calls = []
    monkeypatch.setattr(nnunet_selection, "find_best_configuration", lambda *a, **k: calls.append(k) or {})
    rank.rank_models("Dataset900_Phantom", [rank.parse_model("A:P")], folds=(0, 1))
    assert calls[0]["strict"] is True and calls[0]["folds"] == (0, 1)


def test_rank_takes_nnunets_trainer_and_plans_lists_and_leaves_out_the_pairs_never_trained(tmp_path, capsys,
                                                                                         monkeypatch):
    """nnUNetv2_find_best_configuration -tr A B -p P Q stops at the pairs nobody trained; the wrapper takes the
    same lists and ranks the trained pairs."""
    from nnunet_logonet.demo import rank

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "raw" / "Dataset900_Phantom").mkdir(parents=True)
    for pair in ("nnUNetTrainer__nnUNetPlans", "LoGoNetTrainer__LoGoNetTinyPlans"):
        (tmp_path / "Dataset900_Phantom" / f"{pair}__3d_fullres" / "fold_0" / "validation").mkdir(parents=True)
    # a training refused at its start (a bad -pretrained_weights) leaves a results folder with only its log
    refused = tmp_path / "Dataset900_Phantom" / "LoGoNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    refused.mkdir(parents=True)
    (refused / "training_log_2026_12_7_19_00_00.txt").write_text("refused")
    ranked = []
    monkeypatch.setattr(rank, "rank_models", lambda dataset, models, *args: ranked.append(models) or {})
    assert rank.main(["900", "-tr", "nnUNetTrainer", "LoGoNetTrainer", "-p", "nnUNetPlans", "LoGoNetTinyPlans"]) == 0
    assert [(m["trainer"], m["plans"]) for m in ranked[0]] == [("nnUNetTrainer", "nnUNetPlans"),
                                                                ("LoGoNetTrainer", "LoGoNetTinyPlans")]
    err = capsys.readouterr().err
    assert "left out (no results folder): nnUNetTrainer:LoGoNetTinyPlans\n" in err
    assert ("left out (a results folder, but no fold of -f 0 trained to the end: no fold_N/validation): "
            "LoGoNetTrainer:nnUNetPlans") in err
    ranked.clear()  # a pair trained on one of the folds asked for is ranked: nnU-Net names the missing fold
    assert rank.main(["900", "-tr", "LoGoNetTrainer", "-p", "LoGoNetTinyPlans", "-f", "1", "0"]) == 0
    assert [(m["trainer"], m["plans"]) for m in ranked[0]] == [("LoGoNetTrainer", "LoGoNetTinyPlans")]
    assert rank.main(["900", "-tr", "LoGoNetTrainer", "-p", "LoGoNetTinyPlans", "-f", "1"]) == 1
    assert "no fold of -f 1 trained to the end" in capsys.readouterr().err
    assert rank.main(["900", "-tr", "ULKANetTrainer", "-p", "ULKANetPlans"]) == 1
    assert "none of the trainer x plans pairs has been trained" in capsys.readouterr().err
    ranked.clear()  # a pair given both ways is ranked once
    assert rank.main(["900", "nnUNetTrainer:nnUNetPlans", "-tr", "nnUNetTrainer", "-p", "nnUNetPlans"]) == 0
    assert [(m["trainer"], m["plans"]) for m in ranked[0]] == [("nnUNetTrainer", "nnUNetPlans")]
    for argv, message in ((["900", "-tr", "LoGoNetTrainer"], "-tr and -p go together"),
                          (["900"], "name the models")):
        with pytest.raises(SystemExit):
            rank.main(argv)
        assert message in capsys.readouterr().err


def test_rank_module_imports_neither_torch_nor_nnunet():
    """nnU-Net's evaluation pools start with ``spawn``: each worker of ``python -m
    nnunet_logonet.demo.rank`` imports that module again, so it must stay light (with the demo's
    command imported eagerly the quick demo's rank stage took 107 s instead of 45 s)."""
    code = ("import sys, nnunet_logonet.demo.rank; "
            "print(sorted(m for m in ('torch', 'nnunetv2', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import nnunet_logonet.demo as demo

    assert callable(demo.main) and callable(demo.run_demo)  # the command's names import on first use
    with pytest.raises(AttributeError, match="no_such_name"):
        demo.no_such_name


# ---------------------------------------------------------------------------- figures
def _read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_dice_figure_is_a_readable_png(tmp_path):
    report.plot_dice(synthetic_results(), tmp_path / "dice.png")
    image = _read_png(tmp_path / "dice.png")
    assert image.shape[1] >= 800 and image.shape[0] >= 400  # wide enough for 7 groups of 3 bars
    assert image[..., :3].std() > 0.05  # not blank


def test_pick_slice_prefers_most_organs_then_most_foreground():
    a = np.zeros((4, 8, 8), np.uint8)
    a[1, :4, :4] = 5  # one large organ
    b = np.zeros((3, 8, 8), np.uint8)
    b[2, 0, 0], b[2, 1, 1] = 1, 2  # two small organs
    b[0, :, :] = 5
    assert report.pick_slice({"a": a, "b": b}) == ("b", 2)
    with pytest.raises(ValueError):
        report.pick_slice({})


def test_overlay_has_one_panel_per_label_map_and_organ_colours(tmp_path):
    organs = {o: i + 1 for i, o in enumerate(ORGANS)}
    image = np.linspace(-200, 300, 64 * 64).reshape(64, 64)
    label = np.zeros((64, 64), np.uint8)
    label[10:30, 10:30] = organs["liver"]
    label[40:50, 40:50] = organs["spleen"]
    panels = [("ground truth", label), ("model A", np.roll(label, 3, 0)), ("model B", np.zeros_like(label))]
    report.plot_overlay(image, panels, organs, tmp_path / "overlay.png", title="case")
    picture = _read_png(tmp_path / "overlay.png")[..., :3]
    assert picture.shape[1] > 2 * picture.shape[0]  # three panels side by side
    liver = np.array(report.ORGAN_COLOURS["liver"])
    # liver colour blended over grey appears somewhere: the red-blue excess of purple over grey
    assert np.any((picture[..., 2] - picture[..., 1] > 0.12) & (picture[..., 0] - picture[..., 1] > 0.05))
    assert liver[2] > liver[1]


# ---------------------------------------------------------------------------- parsing
def test_epoch_times_and_seconds_per_case_come_from_nnunet_output(tmp_path):
    (tmp_path / "training_log_2026_01_01_00_00_00.txt").write_text(
        "x: Epoch time: 10.5 s\nx: Epoch time: 9.5 s\n")
    (tmp_path / "training_log_2026_01_02_00_00_00.txt").write_text("x: Epoch time: 8.0 s (pseudo-labelling 1 s)\n")
    runs = epoch_seconds(tmp_path)
    assert runs == [[10.5, 9.5], [8.0]]
    # every run's first epoch left out (it starts the augmentation workers), also a run that logged only one
    # (a run killed after its first epoch); all of them only when no run logged more
    assert seconds_per_iteration(runs, 2) == pytest.approx(9.5 / 2)
    assert seconds_per_iteration([[54.3], [4.0, 4.2, 4.4]], 1) == pytest.approx(4.3)
    assert seconds_per_iteration([[6.0]], 3) == 2.0 and seconds_per_iteration([], 3) is None
    events = [(1.0, "Predicting Phantom_ts000.nii.gz:"), (3.5, "done with Phantom_ts000.nii.gz"),
              (4.0, "Predicting Phantom_ts001.nii.gz:"), (4.25, "done with Phantom_ts001.nii.gz")]
    assert seconds_per_case(events) == {"Phantom_ts000": 2.5, "Phantom_ts001": 0.25}


def test_run_command_logs_measures_and_reports_failures(tmp_path):
    env = dict(os.environ)
    result = run_command([sys.executable, "-c", "import numpy; a = numpy.ones(30_000_000); print('hello')"],
                         env=env, log=tmp_path / "ok.log", watch=lambda line: line == "hello")
    assert "hello" in (tmp_path / "ok.log").read_text()
    assert [line for _, line in result.events] == ["hello"]
    assert result.max_rss_mb > 200  # the 240 MB array, seen by the kernel's accounting
    assert result.cpu_s > 0 and result.wall_s > 0
    with pytest.raises(DemoError, match=r"(?s)exit 3.*boom"):
        run_command([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], env=env, log=tmp_path / "bad.log")


def test_rerun_appends_to_the_log_keeping_the_failed_attempt(tmp_path):
    """A resumed demo reruns the stage that failed or was interrupted: its output must stay readable."""
    log = tmp_path / "stage.log"
    with pytest.raises(DemoError):
        run_command([sys.executable, "-c", "import sys; print('first attempt'); sys.exit(1)"], env=dict(os.environ),
                    log=log)
    run_command([sys.executable, "-c", "print('second attempt')"], env=dict(os.environ), log=log)
    text = log.read_text()
    assert text.index("first attempt") < text.index("second attempt")
    headers = [line for line in text.splitlines() if line.startswith("# ")]
    assert len(headers) == 2 and all(datetime.fromisoformat(h[2:]).tzinfo is not None for h in headers)
    assert text.count("$ ") == 2


def test_interrupted_command_ends_its_output_pump_quietly(tmp_path, monkeypatch):
    """Ctrl-C while a worker of the command (a grandchild, like nnU-Net's) still writes to its pipe:
    the thread copying the output to the log must end without 'I/O operation on closed file'."""
    log = tmp_path / "cmd.log"
    worker = "import time\nfor i in range(40):\n    print('tick', i, flush=True)\n    time.sleep(0.05)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"

    def interrupted(pid, options):
        deadline = time.monotonic() + 60
        while "tick 0" not in log.read_text() and time.monotonic() < deadline:  # the worker writes
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "wait4", interrupted)
    errors, previous_hook = [], threading.excepthook
    threading.excepthook = errors.append
    try:
        before = set(threading.enumerate())
        with pytest.raises(KeyboardInterrupt):
            run_command([sys.executable, "-c", child], env=dict(os.environ), log=log)
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=30)
            assert not thread.is_alive()
    finally:
        threading.excepthook = previous_hook
    assert [str(e.exc_value) for e in errors] == []
    assert log.read_text().rstrip().endswith("# interrupted")


# -------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, flag", [
    ({"preset": "XL"}, "--preset"), ({"device": "tpu"}, "--device"), ({"device": "cuda"}, "--device cuda"),
    ({"dataset_id": 999}, "--dataset-id"), ({"dataset_id": 0}, "--dataset-id"), ({"seed": -1}, "--seed"),
    ({"dataset_id": True}, "--dataset-id"), ({"seed": True}, "--seed"),
])
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(DemoError, match=flag):
        make_settings(cuda_available=False, **kwargs)


def test_cli_rejects_bad_flags_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "huge"])
    assert exit_info.value.code == 2
    assert "--preset" in capsys.readouterr().err


def test_defaults_follow_the_device():
    assert make_settings(device="cpu").preset == "tiny"
    assert make_settings(device="cuda", cuda_available=True).preset == "S"
    assert make_settings(quick=True).budget != make_settings().budget
    # test-time mirroring (nnUNetv2_predict's default) on a GPU; left out on the CPU, where it costs 8x
    assert make_settings(device="cuda", cuda_available=True).tta and not make_settings(device="cpu").tta


def test_only_the_ssl_model_starts_from_the_pretrained_weights():
    """The third model is the same trainer as the second, fine-tuned from the SSL checkpoint: without the
    flag the demo would report a model trained from scratch as '+ SSL'."""
    models = make_settings().models
    assert [(m.key, m.pretrained) for m in models] == [("nnunet", False), ("logonet", False), ("logonet_ssl", True)]


def test_settings_recorded_without_a_key_count_it_as_changed():
    settings = make_settings()
    assert len(settings.differences({})) == len(settings.as_dict())
    assert settings.differences(settings.as_dict()) == []


def test_base_made_with_other_settings_asks_for_fresh(tmp_path):
    DemoState(tmp_path / "demo_state.json", make_settings(seed=0)).save()
    with pytest.raises(DemoError, match=r"seed: 0 -> 1.*--fresh"):
        DemoState.open(tmp_path, make_settings(seed=1))
    assert DemoState.open(tmp_path, make_settings(seed=0)).stages == {}
    (tmp_path / "demo_state.json").write_text(json.dumps({"digest": make_settings(seed=0).digest()}))  # no stages
    with pytest.raises(DemoError, match=r"demo_state.json is unreadable .*--fresh"):
        DemoState.open(tmp_path, make_settings(seed=0))


def test_dataset_id_used_by_another_dataset_is_refused(tmp_path):
    settings = make_settings(dataset_id=42)
    env = demo_environment(tmp_path, settings, environ={"PATH": ""})
    (Path(env["nnUNet_raw"]) / "Dataset043_Liver").mkdir(parents=True)
    with pytest.raises(DemoError, match=r"--dataset-id 42.*Dataset043_Liver"):
        check_dataset_ids(settings, env)
    check_dataset_ids(make_settings(dataset_id=50), env)


def test_environment_keeps_user_folders_and_sets_nnunet_variables(tmp_path):
    settings = make_settings(device="cpu")
    env = demo_environment(tmp_path, settings, environ={"PATH": "", "nnUNet_raw": "/data/raw"})
    assert env["nnUNet_raw"] == "/data/raw"
    assert env["nnUNet_results"] == str(tmp_path.resolve() / "nnUNet_results")
    assert env["nnUNet_compile"] == "f" and env["nnUNet_n_proc_DA"] == "2"
    assert Path(env["nnUNet_extTrainer"]).name == "trainers"


# ------------------------------------------------------------- folders the demo owns
class StagesRan(Exception):
    """Raised in place of the demo's stages: these tests stop where the real work would start."""


def _stop(*args, **kwargs):
    raise StagesRan


def _user_environ(tmp_path: Path) -> dict[str, str]:
    return {"PATH": "", **{v: str(tmp_path / "user" / v) for v in NNUNET_FOLDERS}}


def _demo_folders(settings, env) -> list[Path]:
    return [Path(env[v]) / name for v in NNUNET_FOLDERS for name in (settings.dataset, settings.ssl_dataset)]


@pytest.mark.parametrize("fresh", [True, False])
def test_users_own_dataset_of_the_demos_name_is_kept_and_refused(tmp_path, monkeypatch, fresh):
    """logonet_phantom -d 900 (docs/ssl.md) makes Dataset900_Phantom, the demo's name: the demo must
    neither delete it (--fresh) nor write into it, even where a demo_state.json claims it."""
    settings, environ, base = make_settings(dataset_id=42), _user_environ(tmp_path), tmp_path / "work"
    raw = Path(environ["nnUNet_raw"]) / "Dataset042_Phantom"
    checkpoint = (Path(environ["nnUNet_results"]) / "Dataset042_Phantom" / "LoGoNetTrainer__LoGoNetPlans__3d_fullres"
                  / "fold_0" / "checkpoint_final.pth")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("weeks of GPU time")
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text("{}")
    state = DemoState(base / "demo_state.json", settings)  # outside --base a record does not make it the demo's
    state.record("phantom", status="done", folder=str(raw))
    monkeypatch.setattr(cli, "run_stages", _stop)
    with pytest.raises(DemoError) as error:
        run_demo(settings, base=base, out=tmp_path / "out", fresh=fresh, environ=environ)
    assert str(raw) in str(error.value) and "--dataset-id" in str(error.value) and "move" in str(error.value)
    assert checkpoint.read_text() == "weeks of GPU time" and (raw / "dataset.json").is_file()
    assert not (raw / MARKER).exists() and (base / "demo_state.json").is_file()


def test_fresh_removes_only_the_demos_marked_folders_and_marks_the_new_ones(tmp_path, monkeypatch):
    settings, environ = make_settings(dataset_id=42), _user_environ(tmp_path)
    env = demo_environment(tmp_path / "work", settings, environ)
    folders = _demo_folders(settings, env)
    for folder in folders:
        (folder / "old").mkdir(parents=True)
        (folder / MARKER).write_text("")
    other = Path(env["nnUNet_results"]) / "Dataset050_Other" / "checkpoint_final.pth"
    other.parent.mkdir(parents=True)
    other.write_text("keep")
    seen = {}

    def stages_(ctx, stage_list):
        seen.update({f: sorted(p.name for p in f.iterdir()) if f.exists() else None for f in folders})
        raise StagesRan

    monkeypatch.setattr(cli, "run_stages", stages_)
    with pytest.raises(StagesRan):
        run_demo(settings, base=tmp_path / "work", out=tmp_path / "out", fresh=True, environ=environ)
    for folder in folders:  # raw: made (and marked) by the phantom stages; the others marked before nnU-Net writes
        assert seen[folder] == (None if folder.parent == Path(env["nnUNet_raw"]) else [MARKER]), folder
    assert other.read_text() == "keep"


def test_unmarked_folders_of_an_earlier_demo_in_its_base_are_taken_over(tmp_path, monkeypatch):
    """A demo run by the code before the markers: its folders inside --base are accepted when its
    demo_state.json records that the demo wrote the phantom there (whatever its settings were)."""
    settings, environ, base = make_settings(dataset_id=42), {"PATH": ""}, tmp_path / "work"
    env = demo_environment(base, settings, environ)
    folders = _demo_folders(settings, env)
    for folder in folders:
        folder.mkdir(parents=True)
    monkeypatch.setattr(cli, "run_stages", _stop)
    with pytest.raises(DemoError, match=MARKER):  # no record of the demo making them
        run_demo(settings, base=base, out=tmp_path / "out", environ=environ)
    DemoState(base / "demo_state.json", make_settings(dataset_id=42, seed=3)).record(
        "phantom", status="done", folder=str(Path(env["nnUNet_raw"]) / settings.dataset))
    with pytest.raises(StagesRan):
        run_demo(settings, base=base, out=tmp_path / "out", fresh=True, environ=environ)
    assert [sorted(p.name for p in f.iterdir()) if f.exists() else None for f in folders] == \
        [None, None] + [[MARKER]] * 4


def test_evaluation_reports_each_organ_under_its_own_name_and_nnunets_foreground_mean(tmp_path, monkeypatch):
    """The table's Dice columns come from nnUNetv2_evaluate_folder's summary.json: each label's mean under
    the organ dataset.json names for that label, and the foreground mean as nnU-Net computed it."""
    settings = make_settings(dataset_id=42, device="cpu")
    env = demo_environment(tmp_path, settings, {"PATH": ""})
    ctx = DemoContext(settings, tmp_path, tmp_path / "out", env, DemoState.open(tmp_path, settings))
    ctx.raw_dataset.mkdir(parents=True)
    labels = {"background": 0, "spleen": 1, "kidney": 2, "liver": 3}
    (ctx.raw_dataset / "dataset.json").write_text(json.dumps({"labels": labels}))
    summaries = {}
    for i, model in enumerate(settings.models):
        scores = {"1": 0.91 - i / 10, "2": 0.52 - i / 10, "3": 0.83 - i / 10}
        summaries[model.key] = {"mean": {k: {"Dice": v} for k, v in scores.items()},
                                "foreground_mean": {"Dice": 0.77 - i / 10}}

    def evaluate(command, env, log):
        folder = Path(command[2])
        folder.mkdir(parents=True, exist_ok=True)
        key = next(m.key for m in settings.models if ctx.predictions(m) == folder)
        (folder / "summary.json").write_text(json.dumps(summaries[key]))

    monkeypatch.setattr(stages, "run_command", evaluate)
    scores = stages.run_evaluate(ctx)["models"]
    assert set(scores) == {m.key for m in settings.models} and len(scores) >= 2
    for i, model in enumerate(settings.models):
        assert scores[model.key]["dice"] == pytest.approx({"spleen": 0.91 - i / 10, "kidney": 0.52 - i / 10,
                                                           "liver": 0.83 - i / 10})
        assert scores[model.key]["mean_dice"] == pytest.approx(0.77 - i / 10)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_peak_memory_is_the_training_process_on_cpu_and_the_allocators_on_cuda(device):
    """On the CPU the table's peak memory is nnUNetv2_train's peak resident set; on CUDA, where that would
    count the host's memory, the allocator's peak in a training step from the cost stage."""
    from nnunet_logonet.demo.report import assemble_models

    settings = make_settings(device=device, cuda_available=True)
    stages_record = {f"train_{m.key}": {"max_rss_mb": 2000.0 + i} for i, m in enumerate(settings.models)}
    stages_record["costs"] = {"models": {m.key: {"cuda_training_peak_mb": 500.0 + i}
                                         for i, m in enumerate(settings.models)}}
    models = assemble_models({"device": device}, settings.models, stages_record)
    for i, model in enumerate(settings.models):
        row = models[model.key]
        if device == "cpu":
            assert row["peak_memory_mb"] == 2000.0 + i and "nnUNetv2_train" in row["peak_memory_source"]
        else:
            assert row["peak_memory_mb"] == 500.0 + i and "torch.cuda.max_memory_allocated" in row["peak_memory_source"]


def test_train_never_deletes_a_training_the_demo_did_not_make(tmp_path, monkeypatch):
    settings = make_settings(dataset_id=42, device="cpu")
    env = demo_environment(tmp_path, settings, {"PATH": ""})
    ctx = DemoContext(settings, tmp_path, tmp_path / "out", env, DemoState.open(tmp_path, settings))
    model = settings.models[0]
    folder = stages.checkpoint_folder(ctx.results, settings.dataset, model.trainer, model.plans, "0")
    folder.mkdir(parents=True)
    (folder / "checkpoint_final.pth").write_text("x")
    monkeypatch.setattr(stages, "run_command", _stop)

    def train():
        stages._train(ctx, "train", dataset_id=42, dataset=settings.dataset, fold="0", trainer=model.trainer,
                      plans=model.plans)

    with pytest.raises(DemoError, match="did not make"):
        train()
    assert (folder / "checkpoint_final.pth").is_file()
    (ctx.results / settings.dataset / MARKER).write_text("")
    with pytest.raises(StagesRan):  # the demo's own training of other inputs is started over
        train()
    assert not folder.exists()


# ------------------------------------------------------------------------ stage reuse
def _recording_stage(folder: Path, calls: list, name: str, needs: tuple[str, ...] = ()) -> Stage:
    """A stage that records (name, resuming) in ``calls`` and writes its output file into ``folder``."""
    def run(ctx):
        calls.append((name, ctx.resuming))
        (folder / name).write_text("done")
        return {"value": name}
    return Stage(name, name, run, lambda ctx: [folder / name], needs)


def test_finished_stages_are_reused_and_a_rerun_stage_makes_dependants_rerun(tmp_path):
    settings = make_settings(quick=True)
    calls = []

    def make(name, needs=()):
        return _recording_stage(tmp_path, calls, name, needs)

    stages = [make("a"), make("b", ("a",)), make("c")]

    def run_all():
        ctx = DemoContext(settings, tmp_path, tmp_path, {}, DemoState.open(tmp_path, settings))
        return run_stages(ctx, stages)

    assert run_all() == {"a": False, "b": False, "c": False}
    calls.clear()
    assert run_all() == {"a": True, "b": True, "c": True} and calls == []
    (tmp_path / "a").unlink()  # an output deleted: its stage and what needs it run again
    assert run_all() == {"a": False, "b": False, "c": True}
    # an interrupted stage (recorded as started) is resumed
    state = DemoState.open(tmp_path, settings)
    state.record("c", status="started")
    calls.clear()
    run_all()
    assert calls == [("c", True)]


def test_a_stage_redone_in_an_interrupted_run_still_makes_its_dependants_stale(tmp_path):
    """Run 2 redid a and was interrupted before b: run 3 must redo b (not reuse it), and a b that was
    interrupted before a was redone must start over, not continue (``--c`` on a checkpoint of old inputs)."""
    settings = make_settings(quick=True)
    calls = []
    stages = [_recording_stage(tmp_path, calls, "a"), _recording_stage(tmp_path, calls, "b", ("a",))]

    def run_all():
        return run_stages(DemoContext(settings, tmp_path, tmp_path, {}, DemoState.open(tmp_path, settings)), stages)

    run_all()
    DemoState.open(tmp_path, settings).record("a", status="done")  # run 2 redid a, then stopped
    calls.clear()
    assert run_all() == {"a": True, "b": False} and calls == [("b", False)]
    state = DemoState.open(tmp_path, settings)
    state.record("b", status="started")  # b interrupted ...
    state.record("a", status="done")  # ... then a redone by a later run, stopped before b
    calls.clear()
    run_all()
    assert calls == [("b", False)]


def test_fresh_never_deletes_a_predictions_folder_the_demo_did_not_make(tmp_path, monkeypatch):
    """<base>/predictions of the user's own was deleted by --fresh, whatever the help promised."""
    settings, environ, base = make_settings(dataset_id=42), _user_environ(tmp_path), tmp_path / "work"
    own = base / "predictions" / "my_model" / "case_001.nii.gz"
    own.parent.mkdir(parents=True)
    own.write_text("precious")
    monkeypatch.setattr(cli, "run_stages", _stop)
    for fresh in (True, False):
        with pytest.raises(DemoError, match="predictions exists but was not made by logonet_demo"):
            run_demo(settings, base=base, out=tmp_path / "out", fresh=fresh, environ=environ)
        assert own.read_text() == "precious"
    (base / "predictions" / MARKER).write_text("")  # the demo's own: --fresh removes it, and marks the new one
    with pytest.raises(StagesRan):
        run_demo(settings, base=base, out=tmp_path / "out", fresh=True, environ=environ)
    assert sorted(p.name for p in (base / "predictions").iterdir()) == [MARKER]


def test_a_dataset_the_demo_was_creating_when_killed_is_taken_over_outside_the_base(tmp_path, monkeypatch):
    """SIGKILL while the pretraining dataset was made left its raw folder unmarked; with nnUNet_* set outside
    --base (eval "$(logonet_env)") every rerun, --fresh too, refused it as someone else's."""
    settings, environ, base = make_settings(dataset_id=42), _user_environ(tmp_path), tmp_path / "work"
    env = demo_environment(base, settings, environ)
    ssl_raw = Path(env["nnUNet_raw"]) / settings.ssl_dataset
    ssl_raw.mkdir(parents=True)
    monkeypatch.setattr(cli, "run_stages", _stop)
    with pytest.raises(DemoError, match=settings.ssl_dataset):
        run_demo(settings, base=base, out=tmp_path / "out", environ=environ)
    DemoState(base / "demo_state.json", settings).record("ssl_dataset", status="started", creates=str(ssl_raw))
    with pytest.raises(StagesRan):
        run_demo(settings, base=base, out=tmp_path / "out", environ=environ)
    assert (ssl_raw / MARKER).is_file()


def test_unusable_out_or_base_is_refused_before_any_stage_runs(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(cli, "run_stages", _stop)
    settings = make_settings(dataset_id=42)
    for flag, kwargs in (("--base", {"base": tmp_path / "afile" / "sub", "out": tmp_path / "out"}),
                         ("--out", {"base": tmp_path / "work", "out": tmp_path / "afile" / "sub"})):
        with pytest.raises(DemoError, match=rf"{flag} .*afile/sub: cannot create it \(Not a directory\)"):
            run_demo(settings, environ=_user_environ(tmp_path), **kwargs)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_report_says_when_a_training_was_resumed():
    results = synthetic_results()
    assert not any("Resumed with --c" in note for note in report.table_notes(results))
    results["models"]["nnunet"]["train_resumed"] = True
    (note,) = [note for note in report.table_notes(results) if "Resumed with --c" in note]
    assert results["models"]["nnunet"]["label"] in note and "last nnUNetv2_train process only" in note
    results["ssl_pretraining"] = {**(results.get("ssl_pretraining") or {}), "resumed": True}
    (note,) = [note for note in report.table_notes(results) if "Resumed with --c" in note]
    assert f"{results['models']['nnunet']['label']}, the SSL pretraining." in note and "stage times" in note


def test_table_shows_a_nan_dice_as_a_dash():
    """nnU-Net's evaluator writes NaN for an organ absent from reference and prediction alike."""
    results = synthetic_results()
    results["models"]["nnunet"]["dice"]["aorta"] = float("nan")
    lines = report.format_table(results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next([c.strip() for c in r.strip("|").split("|")] for r in lines[2:]
               if r.split("|")[1].strip() == results["models"]["nnunet"]["label"])
    assert row[header.index("aorta")] == "–"


def test_assembled_models_take_each_figure_from_its_own_stage():
    settings = make_settings(quick=True, device="cpu")
    model = settings.models[0]
    records = {f"train_{model.key}": {"seconds_per_iteration": 1.5, "resumed": True, "max_rss_mb": 900.0},
               f"predict_{model.key}": {"seconds_per_case": 4.0},
               "evaluate": {"models": {model.key: {"dice": {"spleen": 0.9}, "mean_dice": 0.8}}},
               "costs": {"models": {model.key: {"parameters": 10, "macs": 20, "patch_size": [16, 32, 32]}}}}
    row = report.assemble_models({"device": "cpu"}, settings.models, records)[model.key]
    assert (row["dice"], row["mean_dice"], row["seconds_per_case"], row["seconds_per_iteration"]) == \
        ({"spleen": 0.9}, 0.8, 4.0, 1.5)
    assert row["train_resumed"] is True and row["patch_size"] == [16, 32, 32]
    other = report.assemble_models({"device": "cpu"}, settings.models, records)[settings.models[1].key]
    assert other["train_resumed"] is False and other["seconds_per_case"] is None


def test_notes_leave_out_a_model_whose_patch_was_not_recorded():
    results = synthetic_results()
    results["models"]["nnunet"]["patch_size"] = None  # its costs stage did not record one
    (note,) = [n for n in report.table_notes(results) if n.startswith("GMACs")]
    assert results["models"]["nnunet"]["label"] not in note and "16x32x32" in note


def test_markdown_title_wall_time_and_no_ranking_section_without_one(tmp_path):
    results = synthetic_results()  # quick settings, 100 s
    report.write_markdown(results, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# LoGoNet demo results (quick)") and "total wall time 1.7 min" in text
    assert "model selection" not in text


def test_ssl_note_reports_the_validation_pseudo_label_accuracy():
    results = synthetic_results()
    results["ssl_pretraining"] = {"pseudo_label_accuracy": {"train": 0.9, "val": 0.6, "chance": 0.25}}
    (note,) = [n for n in report.table_notes(results) if n.startswith("SSL pretraining")]
    assert "masked slices 0.600 (chance 0.250)" in note


def test_json_writes_paths_as_text(tmp_path):
    report.write_json({"log": tmp_path / "a.log"}, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == {"log": str(tmp_path / "a.log")}


def test_pick_slice_counts_background_as_no_organ():
    label = np.zeros((2, 4, 4), np.uint8)
    label[0] = 3  # one organ filling the slice
    label[1, 0, 0] = 3  # the same organ, one voxel
    assert report.pick_slice({"a": label}) == ("a", 0)


def test_overlay_paints_each_organ_in_its_own_colour():
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    organs = {"spleen": 1, "liver": 6}
    label = np.zeros((8, 8), np.uint8)
    label[:4] = 6
    fig, ax = plt.subplots()
    report._overlay(ax, np.zeros((8, 8)), label, organs)
    rgba = np.asarray(ax.images[-1].get_array())
    plt.close(fig)
    assert np.allclose(rgba[0, 0], (*report.ORGAN_COLOURS["liver"], 0.55))
    assert np.allclose(rgba[7, 7], 0)  # background left clear


def test_overlay_from_files_leaves_out_background_and_models_without_a_prediction(tmp_path, monkeypatch):
    import SimpleITK as sitk

    raw = tmp_path / "raw"
    for folder in ("imagesTs", "labelsTs", "pred_a"):
        (raw / folder).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "spleen": 1, "liver": 2}}))
    label = np.zeros((3, 8, 8), np.uint8)
    label[1, :2, :2] = 1
    label[1, 4:, 4:] = 2
    sitk.WriteImage(sitk.GetImageFromArray(label), str(raw / "labelsTs" / "case_1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(raw / "pred_a" / "case_1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16)), str(raw / "imagesTs" / "case_1_0000.nii.gz"))
    drawn = []
    monkeypatch.setattr(report, "plot_overlay", lambda image, panels, organs, path, title="": drawn.append(organs))
    info = report.overlay_from_files(raw, {"A": raw / "pred_a", "B": raw / "missing"}, tmp_path / "overlay.png")
    assert info == {"case": "case_1", "slice": 1, "panels": ["ground truth", "A"]}
    assert drawn == [{"spleen": 1, "liver": 2}]


# ------------------------------------------------------------------ stage commands and records
def _context(tmp_path: Path, **settings_kwargs) -> DemoContext:
    settings = make_settings(dataset_id=42, device="cpu", **settings_kwargs)
    env = demo_environment(tmp_path, settings, {"PATH": ""})
    return DemoContext(settings, tmp_path, tmp_path / "out", env, DemoState.open(tmp_path, settings))


def _recording_command(calls: list, write=None):
    """A run_command that records each command (and runs ``write(command)`` as the command would)."""
    from nnunet_logonet.demo.runner import CommandResult

    def run(command, env, log, **kwargs):
        command = [str(c) for c in command]
        calls.append((command, env))
        if write:
            write(command)
        return CommandResult(command, str(log), 1.0, 1.0, 100.0, [])
    return run


def test_checkpoint_folder_is_nnunets_layout(tmp_path):
    assert stages.checkpoint_folder(tmp_path, "Dataset042_Phantom", "T", "P", "0") == \
        tmp_path / "Dataset042_Phantom" / "T__P__3d_fullres" / "fold_0"
    ctx = _context(tmp_path)
    assert stages.ssl_checkpoint(ctx) == stages.checkpoint_folder(
        ctx.results, ctx.settings.ssl_dataset, ctx.settings.ssl_trainer, ctx.settings.plans, "all") / \
        "checkpoint_final.pth"


def test_seconds_per_case_ignores_a_case_whose_start_was_not_seen():
    assert seconds_per_case([(2.0, "done with Phantom_ts000.nii.gz")]) == {}


@pytest.mark.parametrize("value", [None, "", "0"])
def test_planning_gets_at_least_one_augmentation_process_without_changing_the_demos_env(tmp_path, value):
    ctx = _context(tmp_path)
    ctx.env.pop("nnUNet_n_proc_DA")
    if value is not None:
        ctx.env["nnUNet_n_proc_DA"] = value
    assert stages._planning_env(ctx)["nnUNet_n_proc_DA"] == "1"
    assert ctx.env.get("nnUNet_n_proc_DA") == value


def test_stage_outputs_and_needs_follow_each_model(tmp_path):
    ctx = _context(tmp_path)
    s = ctx.settings
    (ctx.raw_dataset / "imagesTs").mkdir(parents=True)
    for case in ("Phantom_ts000", "Phantom_ts001"):
        (ctx.raw_dataset / "imagesTs" / f"{case}_0000.nii.gz").write_bytes(b"")
    by_name = {stage.name: stage for stage in stages.build_stages(s)}
    for model in s.models:
        assert by_name[f"predict_{model.key}"].outputs(ctx) == [
            ctx.predictions(model) / f"Phantom_ts00{i}.nii.gz" for i in (0, 1)]
        (final,) = by_name[f"train_{model.key}"].outputs(ctx)
        assert final.name == "checkpoint_final.pth" and f"{model.trainer}__{model.plans}__" in str(final)
    assert by_name["train_nnunet"].needs == ("plan_nnunet",)
    assert by_name["train_logonet"].needs == ("plan_logonet",)
    assert by_name["train_logonet_ssl"].needs == ("plan_logonet", "ssl_pretrain")
    assert by_name["rank"].needs == tuple(f"train_{m.key}" for m in s.models)
    assert by_name["costs"].needs == ("plan_nnunet", "plan_logonet")


def test_phantom_is_reused_only_when_made_with_the_same_settings(tmp_path, monkeypatch):
    import nnunet_logonet.phantom as phantom

    ctx = _context(tmp_path)
    s = ctx.settings

    def write_dataset(raw, dataset_id, **kwargs):
        folder = Path(raw) / s.dataset
        folder.mkdir(parents=True)
        meta = {"phantom": {"seed": kwargs["seed"], "size": kwargs["size"]}, "numTraining": kwargs["num_train"],
                "numTest": kwargs["num_test"], "numUnlabeled": kwargs["num_unlabeled"]}
        (folder / "dataset.json").write_text(json.dumps(meta))
        return folder

    monkeypatch.setattr(phantom, "write_dataset", write_dataset)
    assert stages.run_phantom(ctx) == {"folder": str(ctx.raw_dataset)}
    assert (ctx.raw_dataset / MARKER).is_file()
    assert ctx.state.stages["phantom"]["creates"] == str(ctx.raw_dataset)  # recorded before it was made
    assert stages.run_phantom(ctx) == {"reused_existing": str(ctx.raw_dataset)}
    meta = json.loads((ctx.raw_dataset / "dataset.json").read_text())
    for key, value in (("numUnlabeled", s.num_unlabeled + 1), ("numTest", s.num_test + 1)):
        (ctx.raw_dataset / "dataset.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(DemoError, match="not made with these settings.*--fresh"):
            stages.run_phantom(ctx)
    (ctx.raw_dataset / "dataset.json").write_text('{"phantom": {')  # cut short
    with pytest.raises(DemoError, match="not made with these settings"):
        stages.run_phantom(ctx)


def test_logonet_planning_names_the_presets_planner_and_records_its_patch(tmp_path, monkeypatch):
    ctx = _context(tmp_path)
    s = ctx.settings
    plans = {"configurations": {"3d_fullres": {"patch_size": [16, 32, 32]}}}

    def write_plans(command):
        ctx.plans_file(s.plans).parent.mkdir(parents=True, exist_ok=True)
        ctx.plans_file(s.plans).write_text(json.dumps(plans))

    calls = []
    monkeypatch.setattr(stages, "run_command", _recording_command(calls, write_plans))
    assert stages.run_plan_logonet(ctx)["patch_size"] == [16, 32, 32]
    command, env = calls[0]
    assert command[command.index("-pl") + 1] == s.planner == "LoGoNetTinyPlanner"


def test_pretraining_dataset_folder_is_marked_even_when_a_later_step_fails(tmp_path, monkeypatch):
    from nnunet_logonet.ssl import pipeline

    ctx = _context(tmp_path)

    def fail_after_the_raw_folder(*args, **kwargs):
        (ctx.raw / ctx.settings.ssl_dataset).mkdir(parents=True)
        raise pipeline.PipelineError("nnUNetv2_preprocess failed")

    monkeypatch.setattr(pipeline, "prepare_pretraining_dataset", fail_after_the_raw_folder)
    with pytest.raises(DemoError, match="SSL pretraining dataset: nnUNetv2_preprocess failed"):
        stages.run_ssl_dataset(ctx)
    assert (ctx.raw / ctx.settings.ssl_dataset / MARKER).is_file()


def _train_once(ctx, monkeypatch, *, pretrained=None, logs=None):
    """stages._train of the LoGoNet model with nnUNetv2_train replaced; returns (command, record)."""
    model = ctx.settings.models[1]
    folder = stages.checkpoint_folder(ctx.results, ctx.settings.dataset, model.trainer, model.plans, "0")

    def train(command):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (logs or {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    calls = []
    monkeypatch.setattr(stages, "run_command", _recording_command(calls, train))
    info = stages._train(ctx, "train", dataset_id=42, dataset=ctx.settings.dataset, fold="0", trainer=model.trainer,
                         plans=model.plans, pretrained=pretrained)
    return calls[0][0], info, folder


def test_training_resumes_with_c_only_from_a_checkpoint_and_never_with_pretrained_weights(tmp_path, monkeypatch):
    ctx = _context(tmp_path)
    weights = tmp_path / "ssl.pth"
    mark(ctx.results / ctx.settings.dataset)
    ctx.resuming = True  # interrupted before its first checkpoint: started over, from the SSL weights
    command, info, folder = _train_once(ctx, monkeypatch, pretrained=weights)
    assert "--c" not in command and command[-2:] == ["-pretrained_weights", str(weights)]
    assert info["resumed"] is False
    (folder / "checkpoint_latest.pth").write_text("x")
    command, info, folder = _train_once(ctx, monkeypatch, pretrained=weights)
    assert command[-1] == "--c" and "-pretrained_weights" not in command and info["resumed"] is True
    assert (folder / "checkpoint_latest.pth").is_file()


def test_training_record_reads_nnunets_log_and_validation_summary(tmp_path, monkeypatch):
    ctx = _context(tmp_path, quick=True)
    iterations = ctx.settings.budget["iterations"]
    log = ("Epoch time: 30.0 s\npseudo-label accuracy: train 0.500, val 0.400 (chance 0.250)\n"
           f"Epoch time: {2.0 * iterations} s\npseudo-label accuracy: train 0.800, val 0.700 (chance 0.250)\n")
    summary = json.dumps({"foreground_mean": {"Dice": 0.66}, "mean": {"1": {"Dice": 0.1}}})
    _, info, _ = _train_once(ctx, monkeypatch, logs={"training_log_2026_1_1_00_00_00.txt": log,
                                                     "validation/summary.json": summary})
    assert info["seconds_per_iteration"] == pytest.approx(2.0)
    assert info["pseudo_label_accuracy"] == {"train": 0.8, "val": 0.7, "chance": 0.25}
    assert info["validation_dice"] == 0.66


def test_training_record_reads_a_last_epoch_without_masked_slices_as_nan(tmp_path, monkeypatch):
    """The SSL trainer says "n/a (...)" for an epoch whose validation batches had no masked slice: that epoch
    is the last one, not skipped for the one before."""
    ctx = _context(tmp_path, quick=True)
    log = ("pseudo-label accuracy: train 0.500, val 0.400 (chance 0.250)\n"
           "pseudo-label accuracy: train 0.8000, val n/a (no masked slice in this epoch's validation batches) "
           "(chance 0.2500)\n")
    _, info, _ = _train_once(ctx, monkeypatch, logs={"training_log_2026_1_1_00_00_00.txt": log})
    accuracy = info["pseudo_label_accuracy"]
    assert (accuracy["train"], accuracy["chance"]) == (0.8, 0.25) and np.isnan(accuracy["val"])


def test_ssl_model_trains_on_its_own_plans_copy_and_needs_the_ssl_checkpoint(tmp_path, monkeypatch):
    ctx = _context(tmp_path)
    s = ctx.settings
    model = s.models[2]
    ctx.plans_file(s.plans).parent.mkdir(parents=True)
    ctx.plans_file(s.plans).write_text(json.dumps({"plans_name": s.plans, "configurations": {}}))
    monkeypatch.setattr(stages, "run_command", _stop)
    with pytest.raises(DemoError, match="SSL checkpoint .* is missing"):
        stages.make_train(model)(ctx)
    assert json.loads(ctx.plans_file(model.plans).read_text())["plans_name"] == model.plans == s.ssl_plans


@pytest.mark.parametrize("tta", [False, True])
def test_prediction_starts_from_an_empty_folder_and_follows_the_tta_setting(tmp_path, monkeypatch, tta):
    ctx = _context(tmp_path)
    ctx.settings = DemoSettings(**{**ctx.settings.as_dict(), "tta": tta})
    model = ctx.settings.models[0]
    stale = ctx.predictions(model) / "Phantom_ts009.nii.gz"  # a case of an earlier run
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    calls = []
    monkeypatch.setattr(stages, "run_command", _recording_command(calls))
    stages.make_predict(model)(ctx)
    assert not stale.exists()
    assert ("--disable_tta" in calls[0][0]) is not tta


def test_rank_record_names_models_by_their_keys(tmp_path, monkeypatch):
    ctx = _context(tmp_path)
    models = ctx.settings.models
    ident = {m.key: f"{m.trainer}__{m.plans}__3d_fullres" for m in models}
    ranking = {"all_results": {ident[m.key]: 0.5 + i / 10 for i, m in enumerate(models)},
               "best_model_or_ensemble": {"selected_model_or_models": [
                   {"trainer": models[1].trainer, "plans_identifier": models[1].plans, "configuration": "3d_fullres"},
                   {"trainer": models[0].trainer, "plans_identifier": models[0].plans, "configuration": "3d_fullres"}]}}

    def write(command):
        Path(command[command.index("--json") + 1]).parent.mkdir(parents=True, exist_ok=True)
        Path(command[command.index("--json") + 1]).write_text(json.dumps(ranking))

    monkeypatch.setattr(stages, "run_command", _recording_command([], write))
    record = stages.run_rank(ctx)
    assert record["ranked_dice"] == {m.key: pytest.approx(0.5 + i / 10) for i, m in enumerate(models)}
    assert record["best"] == models[1].key


# ----------------------------------------------------------------------- end to end
@pytest.mark.slow  # ~7 min: outside CI's 15 minutes; `bash scripts/test.sh -m slow`
@pytest.mark.e2e
def test_quick_demo_end_to_end_then_rerun_reuses_everything(tmp_path):
    base, out = tmp_path / "work", tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = ["logonet_demo", "--quick", "--device", "cpu", "--base", str(base), "--out", str(out)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"nnunet", "logonet", "logonet_ssl"}
    for key, model in results["models"].items():
        assert set(model["dice"]) == set(results["organs"]), key
        assert 0.0 <= model["mean_dice"] <= 1.0, key
        for figure in ("parameters", "macs", "seconds_per_case", "seconds_per_iteration", "peak_memory_mb"):
            assert model[figure] is not None and model[figure] > 0, (key, figure)
    assert results["models"]["logonet_ssl"]["pretrained_weights"].endswith("checkpoint_final.pth")
    ranking = results["find_best_configuration"]
    assert set(ranking["validation_dice"]) == {"nnunet", "logonet", "logonet_ssl"}
    assert ranking["best"] == max(ranking["validation_dice"], key=ranking["validation_dice"].get)
    assert (base / "nnUNet_results" / "Dataset900_Phantom" / "inference_information.json").is_file()
    for figure in ("dice_per_organ.png", "overlay.png"):
        assert _read_png(out / figure).shape[0] > 200
    assert report.format_table(results) in first.stdout
    assert "Total wall time" in first.stdout

    start = time.perf_counter()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = json.loads((out / "results.json").read_text())
    assert all(stage["reused"] for stage in rerun["stages"].values())
    assert rerun["models"] == results["models"]
    assert time.perf_counter() - start < 60

    other = subprocess.run([*command, "--seed", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "--fresh" in other.stderr


def test_sigterm_of_the_demo_stops_the_running_command(tmp_path, monkeypatch):
    """`kill` or `timeout` of logonet_demo (exit_cleanly_on_sigterm turns SIGTERM into SystemExit) left the
    nnU-Net command it ran going; the command is now terminated as on Ctrl-C."""
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def terminated(pid, options):
        raise SystemExit(143)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(os, "wait4", terminated)
    with pytest.raises(SystemExit):
        run_command([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ), log=tmp_path / "l")
    assert started and started[0].poll() is not None


@pytest.mark.parametrize("shared", ["base", "dataset"])
def test_a_second_demo_on_the_same_base_or_dataset_is_refused_while_the_first_runs(tmp_path, monkeypatch, shared):
    """Two demos in one --base, or on one dataset id of shared nnU-Net folders, wrote the same checkpoints,
    predictions and state file."""
    import fcntl

    settings, environ = make_settings(dataset_id=42), _user_environ(tmp_path)
    first_base = tmp_path / "work"
    second_base = first_base if shared == "base" else tmp_path / "other"
    env = demo_environment(first_base, settings, environ)
    lock = (first_base / ".logonet_demo.lock" if shared == "base"
            else Path(env["nnUNet_raw"]) / f".{settings.dataset}.logonet_demo.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(cli, "run_stages", _stop)
    with open(lock, "a+") as held:  # the first demo's lock (a separate open file: flock conflicts in-process too)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345\n")
        held.flush()
        with pytest.raises(DemoError, match=r"another logonet_demo \(pid 12345\) is running"):
            run_demo(settings, base=second_base, out=tmp_path / "out", environ=environ)
    with pytest.raises(StagesRan):  # released when the first ends
        run_demo(settings, base=second_base, out=tmp_path / "out", environ=environ)
