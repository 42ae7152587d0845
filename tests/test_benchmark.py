"""logonet_benchmark: every figure for every model, ratios to nnU-Net, JSON, and clear errors."""
from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch

from nnunet_logonet.benchmark.efficiency import format_table, main
from nnunet_logonet.benchmark.measure import time_runs
from nnunet_logonet.benchmark.models import MODELS, load_dataset_plans, nnunet_arch, resolve_model
from nnunet_logonet.benchmark.records import ALLOCATOR_VARIABLES, FIGURES, device_info
from nnunet_logonet.benchmark.lever_ab import main as lever_ab_main

PATCH = ["32", "32", "32"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One real run of the CLI as users run it (one process per model) on the tiny preset, with one
    sliding-window tile and batch 1 so it stays short."""
    out = tmp_path_factory.mktemp("benchmark") / "result.json"
    argv = ["--device", "cpu", "--models", "nnunet", "logonet_tiny", "--patch-size", *PATCH, "--repeats", "1",
            "--warmup", "0", "--batch-size", "1", "--case-size", *PATCH, "--json", str(out), "--chart", str(out.with_suffix(".png")), "--no-progress"]
    return main(argv), out


@pytest.mark.e2e
def test_every_figure_present_and_positive(small_run):
    code, out = small_run
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["nnunet", "logonet_tiny"]
    for name, entry in report["models"].items():
        assert entry["status"] == "ok", entry
        for key in FIGURES:
            assert entry["figures"][key] > 0, (name, key)
            assert entry["ratios"][key] > 0, (name, key)
        # the parameter figure is the network's own count
        spec = resolve_model(name, patch_size=[int(p) for p in PATCH])
        assert entry["figures"]["parameters"] == sum(p.numel() for p in spec.build().parameters())
        # measured in its own process: the peak is above what the process held before building the model
        assert entry["details"]["peak_rss_mb"] > entry["details"]["rss_before_model_mb"]
    assert report["settings"]["memory_isolation"] == "one process per model"
    assert report["models"]["logonet_tiny"]["details"]["layout"] == "channels_last_3d"
    assert report["models"]["nnunet"]["details"]["layout"] == "contiguous"
    assert report["models"]["nnunet"]["details"]["trainer"] == "nnUNetTrainer"
    assert report["models"]["logonet_tiny"]["details"]["trainer"] == "LoGoNetTrainer"
    for entry in report["models"].values():  # what the allocator cost each timed call
        costs = entry["details"]["process_costs_per_call"]
        assert set(costs) == {"forward_s", "sliding_window_s", "train_step_s"}
        assert all(c["minor_page_faults"] >= 0 and c["system_s"] >= 0 for c in costs.values())
    assert "minor page faults per training step" in format_table(report)


@pytest.mark.e2e
def test_reference_kernels_run_is_labelled_and_counts_the_same_macs(small_run, tmp_path):
    """--reference-kernels gives the 'before' of docs/speed.md: same architecture, plain PyTorch ops."""
    out = tmp_path / "reference.json"
    argv = ["--device", "cpu", "--models", "logonet_tiny", "--patch-size", *PATCH, "--repeats", "1", "--warmup", "0",
            "--batch-size", "1", "--case-size", *PATCH, "--reference-kernels", "--no-isolate", "--json", str(out),
            "--no-progress"]
    assert main(argv) == 0
    reference = json.loads(out.read_text())["models"]["logonet_tiny"]
    fast = json.loads(small_run[1].read_text())["models"]["logonet_tiny"]
    assert (reference["details"]["kernels"], fast["details"]["kernels"]) == ("reference", "fast")
    assert reference["figures"]["macs"] == fast["figures"]["macs"] > 0
    assert reference["figures"]["parameters"] == fast["figures"]["parameters"]


@pytest.mark.e2e
def test_without_adds_a_row_per_model_with_those_levers_off(tmp_path):
    """--without LEVER: the before/after of one lever in the same run, next to the model as shipped."""
    out = tmp_path / "without.json"
    argv = ["--device", "cpu", "--models", "nnunet", "logonet_tiny", "--patch-size", *PATCH, "--repeats", "1",
            "--warmup", "0", "--batch-size", "1", "--case-size", *PATCH, "--without", "post_ops", "batchnorm_folding",
            "--without", "onednn", "--no-isolate", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["nnunet", "logonet_tiny", "logonet_tiny-without-post_ops+batchnorm_folding",
                            "logonet_tiny-without-onednn"]
    assert models["logonet_tiny-without-onednn"]["details"]["kernels"] == "fast without onednn"
    fast, without = models["logonet_tiny"], models["logonet_tiny-without-post_ops+batchnorm_folding"]
    assert (fast["details"]["kernels"], without["details"]["kernels"]) == (
        "fast", "fast without post_ops, batchnorm_folding")
    assert without["spec"]["without_levers"] == ["post_ops", "batchnorm_folding"]
    assert without["figures"]["macs"] == fast["figures"]["macs"] > 0
    assert all(without["ratios"][key] > 0 for key in FIGURES)


@pytest.mark.parametrize("argv, message", [
    (["--without", "narrowing"], "invalid choice: 'narrowing'"),
    (["--without", "post_ops", "--reference-kernels"], "use one of the two"),
    (["--models", "nnunet", "--without", "post_ops"], "--without applies to LoGoNet/ULKANet models"),
])
def test_without_rejects_unknown_levers_and_other_models(argv, message, capsys):
    try:
        code = main(["--patch-size", *PATCH, *argv])
    except SystemExit as usage:  # argparse's own check of the choices
        code = usage.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.e2e
def test_ratios_are_to_nnunet(small_run):
    report = json.loads(small_run[1].read_text())
    ref, tiny = report["models"]["nnunet"], report["models"]["logonet_tiny"]
    assert all(r == 1.0 for r in ref["ratios"].values())
    for key in FIGURES:
        assert tiny["ratios"][key] == pytest.approx(tiny["figures"][key] / ref["figures"][key])


@pytest.mark.e2e
def test_json_round_trips_with_device_info(small_run):
    text = small_run[1].read_text()
    report = json.loads(text)
    assert json.loads(json.dumps(report)) == report
    info = report["device_info"]
    for key in ("cpu_model", "torch_cpu_capability", "torch_threads", "torch", "load_average_start", "load_average_end"):
        assert info[key] is not None, key
    assert report["command"].startswith("logonet_benchmark ") and "--patch-size 32 32 32" in report["command"]
    assert report["date"] and report["patch_size"] == [32, 32, 32]
    assert "multiply-accumulate" in report["settings"]["flop_counter"]
    assert isinstance(info["allocator"], dict)


def test_interrupted_rerun_keeps_the_complete_record_and_its_progress_beside_it(tmp_path, monkeypatch):
    """--json FILE is replaced only when the run completes; until then the figures so far are in FILE.partial."""
    from nnunet_logonet.benchmark import efficiency

    measured = []

    def fake_measure(spec, settings, *, skip_training=None):
        if len(measured) == 1 and interrupt:
            raise KeyboardInterrupt  # Ctrl-C during the second model
        measured.append(spec.name)
        return {"status": "ok", "figures": {"parameters": 1.0 + len(measured)}, "details": {}}

    monkeypatch.setattr(efficiency, "measure_model", fake_measure)
    monkeypatch.setattr(efficiency, "estimate_memory_mb", lambda *args: {"train_mb": 0.0, "inference_mb": 0.0})
    specs = [resolve_model(name, patch_size=[int(p) for p in PATCH]) for name in ("nnunet", "logonet_tiny")]
    settings = efficiency.default_settings(torch.device("cpu"), [int(p) for p in PATCH])
    out, partial = tmp_path / "record.json", tmp_path / "record.json.partial"
    out.write_text('{"models": {"complete": {}}}\n')
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        efficiency.run_benchmark(specs, settings, isolate=False, memory_check=False, json_path=out, progress=False)
    assert json.loads(out.read_text()) == {"models": {"complete": {}}}, "the complete record was replaced"
    assert list(json.loads(partial.read_text())["models"]) == ["nnunet"]
    measured.clear()
    interrupt = False
    efficiency.run_benchmark(specs, settings, isolate=False, memory_check=False, json_path=out, progress=False)
    assert list(json.loads(out.read_text())["models"]) == ["nnunet", "logonet_tiny"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
    assert "FILE.partial" in efficiency.build_parser().format_help()


def test_interleaved_run_also_writes_its_record_only_when_complete(tmp_path, monkeypatch):
    from nnunet_logonet.benchmark import efficiency, interleaved

    out = tmp_path / "record.json"
    out.write_text("{}\n")
    seen = []

    def fake_interleaved(specs, settings, rounds, *, json_path=None, **kwargs):
        seen.append(Path(json_path))
        Path(json_path).write_text('{"models": {}}')
        assert out.read_text() == "{}\n", "FILE must stay untouched while the run is going on"
        return {"models": {"nnunet": {}}}

    monkeypatch.setattr(interleaved, "run_interleaved", fake_interleaved)
    monkeypatch.setattr(efficiency, "format_table", lambda report: "")
    assert main(["--models", "nnunet", "--patch-size", *PATCH, "--interleave", "1", "--json", str(out)]) == 0
    assert seen == [tmp_path / "record.json.partial"]
    assert json.loads(out.read_text()) == {"models": {"nnunet": {}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_records_name_the_commit_of_the_code_and_uncommitted_changes(tmp_path):
    """A record says which code gave its figures: the commit its file was checked out from, marked when
    tracked files differ from it (untracked files do not count); nothing for a file git does not track
    (an installed copy, even one inside a checkout) or outside a repository."""
    import subprocess

    from nnunet_logonet.benchmark.records import code_revision

    module = tmp_path / "module.py"
    module.write_text("x = 1\n")
    assert code_revision(module) is None  # no repository
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "module.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout
    assert code_revision(module) == head.strip()
    (tmp_path / "installed.py").write_text("untracked\n")
    assert code_revision(module) == head.strip()  # untracked files are not changes
    assert code_revision(tmp_path / "installed.py") is None  # not the repository's code
    module.write_text("x = 2\n")
    assert code_revision(module) == head.strip() + "+changes"
    this_checkout = code_revision()
    assert this_checkout is None or this_checkout.split("+")[0] == subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip()


@pytest.mark.e2e
def test_a_fresh_run_charts_with_this_machines_name(small_run, tmp_path, capsys):
    from nnunet_logonet.benchmark import ratio_chart
    from nnunet_logonet.machine import cpu_kind

    report = json.loads(small_run[1].read_text())
    chart = tmp_path / "ratios.png"
    assert ratio_chart.main([str(small_run[1]), "--models", "logonet_tiny", "-o", str(chart)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "| logonet_tiny |" in line)
    revision = report["device_info"]["nnunet_logonet_revision"]
    code = f"code {revision}, " if revision else ""
    assert row.startswith(f"| {cpu_kind(report['device_info'])}, 32^3, alone, {code}{report['date'][:10]} |")
    ratios = report["models"]["logonet_tiny"]["ratios"]
    assert row.split("|")[3:6] == [f" {ratios[k]:.2f}x " for k in ("forward_s", "train_step_s", "sliding_window_s")]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert small_run[1].with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the run's own --chart


def test_chart_needs_the_reference_model_in_the_run(tmp_path, capsys):
    assert main(["--models", "logonet_tiny", "--patch-size", *PATCH, "--chart", str(tmp_path / "c.png")]) == 2
    assert "add nnunet to --models" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="page faults are counted through getrusage on Linux")
def test_time_runs_counts_the_page_faults_of_fresh_memory():
    """A call that writes 64 MB of freshly mapped memory faults its pages in (4 KB each, or 2 MB huge pages)."""
    size = 64 * 2 ** 20
    zeros = bytes(size)

    def write_fresh_memory():
        # an anonymous mapping of its own: a tensor of this size may come from a free chunk glibc's
        # heap still holds from an earlier test, pages already in (this test failed once that way)
        with mmap.mmap(-1, size) as fresh:
            fresh.write(zeros)

    costs: dict = {}
    times = time_runs(write_fresh_memory, warmup=1, repeats=3, device=torch.device("cpu"), costs=costs)
    assert len(times) == 3
    assert costs["minor_page_faults"] >= 32 and costs["system_s"] >= 0
    quiet: dict = {}
    time_runs(lambda: None, warmup=0, repeats=3, device=torch.device("cpu"), costs=quiet)
    assert quiet["minor_page_faults"] < costs["minor_page_faults"]


def test_allocator_settings_are_recorded_and_printed(monkeypatch):
    """CPU times depend on glibc's allocator (docs/speed.md): a run says which settings it had."""
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    report = json.loads((Path(__file__).parents[1] / "docs/benchmarks/cpu_64.json").read_text())
    report["device_info"] = device_info(torch.device("cpu"))
    assert report["device_info"]["allocator"] == {}
    assert "allocator: glibc defaults" in format_table(report)

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    report["device_info"] = device_info(torch.device("cpu"))
    assert report["device_info"]["allocator"] == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}
    table = format_table(report)
    assert "allocator: GLIBC_TUNABLES=glibc.malloc.mmap_max=0" in table and "glibc defaults" not in table


class _Captured(Exception):
    pass


@pytest.mark.parametrize("argv, patch, source", [
    (["--device", "cpu"], [64, 64, 64], "cpu default"),
    (["--device", "cpu", "--patch-size", "96", "96", "96"], [96, 96, 96], "--patch-size"),
])
def test_cpu_default_patch_is_64_and_says_so(monkeypatch, argv, patch, source):
    """The plain `logonet_benchmark --device cpu` must finish in minutes on 2 cores: 64^3 unless asked."""
    from nnunet_logonet.benchmark import efficiency

    def capture(specs, settings, **kwargs):
        raise _Captured(specs, settings, kwargs["meta"])

    monkeypatch.setattr(efficiency, "run_benchmark", capture)
    with pytest.raises(_Captured) as caught:
        main([*argv, "--models", "nnunet", "logonet_tiny"])
    specs, settings, meta = caught.value.args
    assert meta["patch_size"] == patch and meta["patch_size_from"] == source
    assert all(list(spec.patch_size) == patch for spec in specs)
    assert settings.case_size == [p * 3 // 2 for p in patch]
    note = efficiency._patch_note(meta)
    assert ("--patch-size 96 96 96" in note) == (source == "cpu default")


def test_unknown_model_exits_2_listing_valid(capsys):
    assert main(["--models", "nnunet", "logonet_xl"]) == 2
    err = capsys.readouterr().err
    assert "logonet_xl" in err
    assert all(name in err for name in MODELS)


def test_bad_patch_size_names_the_multiples(capsys):
    assert main(["--models", "logonet_tiny", "--patch-size", "40", "64", "64"]) == 2
    err = capsys.readouterr().err
    assert "[40, 64, 64]" in err and "multiple of" in err and "Nearest valid sizes" in err


@pytest.mark.parametrize("argv, message", [
    (["--num-classes", "1"], "--num-classes counts the background too"),
    (["--device", "mps"], "--device must be cpu or cuda, got 'mps'"),
    (["--device", "nonsense"], "is not a device"),
])
def test_bad_classes_and_devices_exit_2_with_the_fix(argv, message, capsys):
    assert main(["--models", "nnunet", "--patch-size", "16", "32", "32", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("mps", "--device must be cpu or cuda"),
                                             ("nonsense", "is not a device")]
                         + ([("cuda", "torch sees no CUDA device")] if not torch.cuda.is_available() else []))
def test_lever_ab_checks_the_device_as_the_benchmark_does(device, message, capsys):
    assert lever_ab_main(["--lever", "onednn", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("logonet_lever_ab: error:") and message in err


def test_dataset_without_plans_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["-d", "987", "--models", "nnunet"]) == 2
    assert "nnUNetv2_plan_and_preprocess -d 987" in capsys.readouterr().err


def write_plans(root, patch, spacing):
    """A minimal nnUNetPlans.json + dataset.json as nnU-Net's default planner would write them."""
    cls, arch, imports = nnunet_arch(patch, spacing)
    folder = root / "Dataset987_Aniso"
    folder.mkdir()
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": patch, "median_image_size_in_voxels": [40, 120, 120],
              "spacing": spacing, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "architecture": {"network_class_name": cls, "arch_kwargs": arch, "_kw_requires_import": imports}}
    plans = {"dataset_name": folder.name, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": spacing,
             "original_median_shape_after_transp": [40, 120, 120], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "liver": 1, "spleen": 2}}))
    return arch


def _context(plans):
    return dict(patch_size=plans.patch_size, spacing=plans.spacing, input_channels=plans.input_channels,
                num_classes=plans.num_classes, plans=plans)


def test_dataset_plans_set_patch_and_topology(tmp_path):
    """With -d, nnunet is the plans' network unchanged and LoGoNet's strides follow the spacing."""
    arch = write_plans(tmp_path, [32, 64, 64], [3.0, 0.8, 0.8])
    loaded = load_dataset_plans(987, tmp_path)
    assert loaded.patch_size == (32, 64, 64) and loaded.num_classes == 3 and loaded.input_channels == 1
    assert resolve_model("nnunet", **_context(loaded)).arch_kwargs == arch
    logonet = resolve_model("logonet_tiny", **_context(loaded))
    assert logonet.patch_size == (32, 64, 64) and not logonet.notes
    assert logonet.arch_kwargs["strides"][1] == [1, 2, 2]  # thick slices are not pooled first


def test_dataset_patch_logonet_cannot_take_is_rounded_with_a_note(tmp_path):
    write_plans(tmp_path, [40, 64, 64], [1.0, 1.0, 1.0])
    loaded = load_dataset_plans(987, tmp_path)
    logonet = resolve_model("logonet_tiny", **_context(loaded))
    assert logonet.patch_size != (40, 64, 64)
    assert logonet.notes and "40, 64, 64" in logonet.notes[0]


@pytest.mark.parametrize("name, trainer_class", [("nnunet", "nnUNetTrainer"), ("logonet_tiny", "LoGoNetTrainer")])
def test_training_step_uses_the_optimizer_of_the_models_trainer(name, trainer_class):
    """The timed step's SGD is the one each trainer builds (LoGoNetTrainer: PyTorch's fused CPU kernel)."""
    from types import SimpleNamespace

    from nnunet_logonet.benchmark.measure import default_settings, make_train_step
    from nnunet_logonet.training.recipes import build_optimizer_and_scheduler

    cpu = torch.device("cpu")
    spec = resolve_model(name, patch_size=[16, 32, 32])
    assert spec.trainer == trainer_class
    net = spec.build()
    step = make_train_step(net, spec, default_settings(cpu, spec.patch_size, batch_size=1), cpu,
                           torch.contiguous_format)
    timed = step.optimizer
    if trainer_class == "LoGoNetTrainer":
        trainer = SimpleNamespace(network=net, device=cpu, recipe="nnunet", initial_lr=1e-2, weight_decay=3e-5,
                                  num_epochs=1)
        built, _ = build_optimizer_and_scheduler(trainer)
        assert timed.defaults["fused"] is built.defaults["fused"] is True
    else:  # nnUNetTrainer.configure_optimizers: torch.optim.SGD with PyTorch's defaults
        assert not timed.defaults["fused"] and not timed.defaults["foreach"]
    assert isinstance(timed, torch.optim.SGD) and timed.defaults["nesterov"] and timed.defaults["momentum"] == 0.99
    step()  # and it runs
    assert all(timed.state[p] for p in net.parameters() if p.grad is not None)


def test_lever_ab_alternates_the_order_and_switches_only_the_levers():
    from nnunet_logonet.benchmark.lever_ab import interleaved_times
    from nnunet_logonet.network.levers import lever_enabled

    seen = []
    samples = interleaved_times({"f": lambda: seen.append((lever_enabled("post_ops"), lever_enabled("onednn")))},
                                ["post_ops"], 3, torch.device("cpu"))
    # untimed on + off, then on/off, off/on, on/off
    assert [post_ops for post_ops, _ in seen] == [True, False, True, False, False, True, True, False]
    assert all(onednn for _, onednn in seen)
    assert len(samples["f"]["on"]) == len(samples["f"]["off"]) == 3
    seen.clear()  # in blocks: each state's calls in a row, the first of each block untimed
    samples = interleaved_times({"f": lambda: seen.append((lever_enabled("post_ops"), None))},
                                ["post_ops"], 2, torch.device("cpu"), block=3)
    assert [post_ops for post_ops, _ in seen] == [True, False] + [True] * 3 + [False] * 6 + [True] * 3
    assert len(samples["f"]["on"]) == len(samples["f"]["off"]) == 4


@pytest.mark.e2e
def test_lever_ab_command_writes_both_states_of_each_figure(tmp_path, capsys):
    from nnunet_logonet.benchmark.lever_ab import main as lever_ab

    out = tmp_path / "ab.json"
    assert lever_ab(["--model", "logonet_tiny", "--patch-size", *PATCH, "--lever", "post_ops", "--figures", "forward",
                     "sw", "--rounds", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["levers_off"] == ["post_ops"] and report["model"] == "logonet_tiny"
    assert set(report["samples_s"]) == {"forward", "sw"}
    for by_state in report["samples_s"].values():
        assert len(by_state["on"]) == len(by_state["off"]) == 2 and min(by_state["on"] + by_state["off"]) > 0
    assert "off/on" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lever_ab(["--lever", "narrowing"])


@pytest.mark.e2e
def test_lever_memory_runs_each_setting_in_its_own_process(tmp_path, capsys):
    """``python -m nnunet_logonet.benchmark.lever_memory``: each setting in a fresh process (a peak only
    grows), the lever really off in the 'off' one (LoGoNet-tiny's 64^3 inference outputs of 16 MiB go
    to the kept blocks with ``output_buffers`` on, nowhere with it off), figures in the JSON."""
    from nnunet_logonet.benchmark.lever_memory import main as lever_memory

    out = tmp_path / "memory.json"
    assert lever_memory(["--model", "logonet_tiny", "--patch-size", "64", "64", "64", "--lever", "output_buffers",
                         "--figure", "forward", "--calls", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    on, off = report["results"]["on"], report["results"]["off"]
    assert on["kept_mib"] >= 16 and off["kept_mib"] == 0
    assert min(on["peak_rss_mb"], off["peak_rss_mb"]) > 100
    assert len(on["seconds"]) == len(off["seconds"]) == 2
    assert report["levers_off"] == ["output_buffers"] and report["figure"] == "forward"
    assert "peak RSS on/off" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lever_memory(["--lever", "no_such_lever"])
    assert lever_memory(["--lever", "output_buffers", "--calls", "0"]) == 2
    assert "--calls" in capsys.readouterr().err


def test_interleave_rotates_the_order_each_round_inside_each_models_fast_paths():
    from nnunet_logonet.benchmark.interleaved import interleaved_rounds
    from nnunet_logonet.network.levers import lever_enabled, reference_kernels

    seen = []
    calls = {name: (lambda name=name: seen.append((name, lever_enabled("post_ops")))) for name in "abc"}
    samples = interleaved_rounds(calls, 4, torch.device("cpu"), warmup=1,
                                 contexts={"b": lambda: reference_kernels("post_ops")})
    # one warm-up each, then rounds a b c / b c a / c a b / a b c
    assert "".join(name for name, _ in seen) == "abc" + "abc" + "bca" + "cab" + "abc"
    assert all(post_ops == (name != "b") for name, post_ops in seen)
    assert {name: len(v) for name, v in samples.items()} == {"a": 4, "b": 4, "c": 4}


def test_interleaved_ratios_are_medians_of_the_per_round_ratios():
    """A machine that slows down between rounds moves both models' times, not their paired ratio."""
    from nnunet_logonet.benchmark.interleaved import _add_paired_ratios

    entries = {"nnunet": {"figures": {"parameters": 10, "train_step_s": 3.0}, "samples": {"train_step_s": [1.0, 3.0, 9.0]}},
               "logonet_s": {"figures": {"parameters": 40, "train_step_s": 2.7},
                             "samples": {"train_step_s": [0.8, 2.7, 9.9]}}}
    _add_paired_ratios(entries)
    assert entries["logonet_s"]["ratios"]["parameters"] == 4.0
    assert entries["logonet_s"]["ratios"]["train_step_s"] == pytest.approx(0.9)  # per round 0.8, 0.9, 1.1
    assert entries["logonet_s"]["ratio_ranges"]["train_step_s"] == pytest.approx([0.8, 1.1])
    assert entries["nnunet"]["ratios"]["train_step_s"] == 1.0


@pytest.mark.e2e
def test_interleave_command_times_every_model_in_rounds(tmp_path, capsys):
    out = tmp_path / "interleaved.json"
    argv = ["--device", "cpu", "--models", "nnunet", "logonet_tiny", "--patch-size", *PATCH, "--batch-size", "1",
            "--case-size", *PATCH, "--interleave", "2", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["interleave_rounds"] == 2
    for name, entry in report["models"].items():
        assert entry["status"] == "ok"
        assert entry["figures"]["parameters"] > 0 and entry["figures"]["macs"] > 0
        assert "peak_memory_mb" not in entry["figures"]  # one process: no honest peak
        for figure in ("forward_s", "sliding_window_s", "train_step_s"):
            assert len(entry["samples"][figure]) == 2 and min(entry["samples"][figure]) > 0
            lo, hi = entry["ratio_ranges"][figure]
            assert lo <= entry["ratios"][figure] <= hi
    assert report["models"]["logonet_tiny"]["details"]["layout"] == "channels_last_3d"
    printed = capsys.readouterr().out
    assert "interleaved rounds" in printed and "logonet_tiny: per-round ratios" in printed
    assert main([a if a != "2" else "0" for a in argv]) == 2  # --interleave 0: a usage error
    assert "--interleave must be >= 1" in capsys.readouterr().err
    assert main(argv + ["--repeats", "3"]) == 2
    assert "drop --repeats" in capsys.readouterr().err


def test_default_settings_per_device():
    """The CLI help's defaults: cpu 1 warm-up, 3 repeats, one sliding window after none; cuda 3, 10, as
    --repeats after one; fp16 only on CUDA."""
    from nnunet_logonet.benchmark.measure import default_settings

    cpu = default_settings(torch.device("cpu"), [64, 64, 64], amp=True)
    assert (cpu.warmup, cpu.repeats, cpu.sw_warmup, cpu.sw_repeats, cpu.amp) == (1, 3, 0, 1, False)
    cuda = default_settings(torch.device("cuda"), [96, 96, 96])
    assert (cuda.warmup, cuda.repeats, cuda.sw_warmup, cuda.sw_repeats, cuda.amp) == (3, 10, 1, 10, True)
    assert default_settings(torch.device("cpu"), [64] * 3, repeats=5).sw_repeats == 1


def test_time_runs_warms_up_then_gives_each_timed_calls_costs(monkeypatch):
    from nnunet_logonet.benchmark import measure

    calls = []
    monkeypatch.setattr(measure, "process_costs", lambda: (7 * len(calls), 0.5 * len(calls)))
    costs: dict = {}
    times = measure.time_runs(lambda: calls.append(1), warmup=2, repeats=4, device=torch.device("cpu"), costs=costs)
    assert len(calls) == 6 and len(times) == 4
    assert costs == {"minor_page_faults": 7, "system_s": 0.5}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_resident_set_is_in_mib_and_falls_back_to_the_peak_since_start(monkeypatch):
    import os

    from nnunet_logonet.benchmark.measure import ResidentSetPeak

    rss = ResidentSetPeak()
    statm = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    assert rss.current_mb() == pytest.approx(statm, rel=0.01)
    rss.reset()
    assert rss.method.startswith("VmHWM")
    assert rss.peak_mb() >= rss.current_mb() * 0.99 and rss._maxrss_mb() >= rss.current_mb() * 0.99

    def no_clear_refs(self, *args, **kwargs):
        raise PermissionError("clear_refs")

    monkeypatch.setattr(Path, "write_text", no_clear_refs)
    fallback = ResidentSetPeak()
    fallback.reset()
    assert fallback.method.startswith("ru_maxrss")
    assert fallback.peak_mb() == fallback._maxrss_mb()


class _FakeRss:
    before, peak = 500.0, 1700.0

    def __init__(self):
        self.method = "fake"

    def current_mb(self):
        return self.before

    def peak_mb(self):
        return self.peak

    def reset(self):
        pass

    def release_free_memory(self):
        pass


def test_measured_figures_are_medians_and_the_peak_is_over_the_models_baseline(monkeypatch):
    from nnunet_logonet.benchmark import measure

    timed = []

    def fake_time_runs(fn, warmup, repeats, device, costs=None):
        timed.append((warmup, repeats))
        return [3.0, 1.0, 2.0]

    monkeypatch.setattr(measure, "time_runs", fake_time_runs)
    monkeypatch.setattr(measure, "ResidentSetPeak", _FakeRss)
    spec = resolve_model("nnunet", patch_size=[16, 16, 16])
    settings = measure.default_settings(torch.device("cpu"), spec.patch_size, batch_size=1, warmup=2, repeats=3)
    result = measure.measure_model(spec, settings)
    assert timed == [(2, 3), (0, 1), (2, 3)]  # forward, sliding window, training
    figures = result["figures"]
    assert figures["forward_s"] == figures["sliding_window_s"] == figures["train_step_s"] == 2.0
    assert figures["peak_memory_mb"] == 1200.0
    assert (result["details"]["peak_rss_mb"], result["details"]["rss_before_model_mb"]) == (1700.0, 500.0)

    monkeypatch.setattr(_FakeRss, "peak", 400.0)  # the resident set did not grow: no figure, and why
    result = measure.measure_model(spec, settings)
    assert result["figures"]["peak_memory_mb"] is None
    assert any("peak memory not measured" in note for note in result["details"]["notes"])

    result = measure.measure_model(spec, settings, skip_training="needs ~9.0 GB")
    assert "train_step_s" not in result["figures"] and "peak_memory_mb" not in result["figures"]
    assert "training not run: needs ~9.0 GB" in result["details"]["notes"]


class _CountingNet(torch.nn.Conv3d):
    def __init__(self):
        super().__init__(1, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("mirroring, case, tiles, calls", [(False, None, 8, 8), (True, None, 8, 64),
                                                           (False, [8, 16, 16], 1, 1)])
def test_sliding_window_counts_its_tiles_and_mirrors_when_asked(mirroring, case, tiles, calls):
    from types import SimpleNamespace

    from nnunet_logonet.benchmark.measure import default_settings, make_sliding_window

    spec = SimpleNamespace(patch_size=(16, 16, 16), num_classes=2, input_channels=1)
    settings = default_settings(torch.device("cpu"), spec.patch_size, mirroring=mirroring, case_size=case)
    net = _CountingNet().eval()
    predict, counted = make_sliding_window(net, spec, settings, torch.device("cpu"))
    predict()
    assert (counted, net.calls) == (tiles, calls)


def test_without_row_switches_off_only_its_levers():
    import dataclasses

    from nnunet_logonet.benchmark.measure import default_settings, kernels_for
    from nnunet_logonet.network.levers import lever_enabled

    spec = dataclasses.replace(resolve_model("logonet_tiny", patch_size=[32, 32, 32]), without_levers=("post_ops",))
    settings = default_settings(torch.device("cpu"), spec.patch_size)
    factory, label = kernels_for(spec, settings)
    with factory():
        assert not lever_enabled("post_ops") and lever_enabled("onednn")
    assert label == "fast without post_ops"
    assert spec.to_json()["without_levers"] == ["post_ops"]
    settings.reference_kernels = True
    factory, label = kernels_for(spec, settings)
    with factory():
        assert not lever_enabled("post_ops") and not lever_enabled("onednn")
    assert label == "reference"


def test_memory_estimate_uses_each_layouts_bytes_per_element():
    from nnunet_logonet.benchmark.measure import estimate_memory_mb
    from nnunet_logonet.benchmark.models import feature_map_elements
    from nnunet_logonet.counting import count_parameters

    for name, per_element in (("nnunet", 18.0), ("logonet_tiny", 8.0)):
        spec = resolve_model(name, patch_size=[32, 32, 32])
        elements, params = feature_map_elements(spec), count_parameters(spec.build(init=False))
        estimate = estimate_memory_mb(spec, 2, "cpu")
        assert estimate["train_mb"] == pytest.approx((elements * 2 * per_element + params * 16) / 2 ** 20)
        assert estimate["inference_mb"] == pytest.approx((elements + params) * 4 / 2 ** 20)


def test_nnunet_reference_networks_are_the_ones_the_committed_records_measured():
    """The reference every ratio divides by: nnU-Net's planner's topology for the patch, as recorded."""
    for record in ("cpu_64.json", "cuda_96_h100.json"):
        report = json.loads((Path(__file__).parents[1] / "docs/benchmarks" / record).read_text())
        for name in ("nnunet", "resenc_m"):
            spec = resolve_model(name, patch_size=report["patch_size"], spacing=report["spacing"])
            stored = report["models"][name]["spec"]
            assert (spec.network_class_name, spec.arch_kwargs) == (stored["network_class_name"], stored["arch_kwargs"])
    _, arch, _ = nnunet_arch([128, 128, 128], [1.0, 1.0, 1.0])
    assert arch["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    spec = resolve_model("nnunet", patch_size=[16, 32, 32], input_channels=2, num_classes=3)
    assert (spec.input_channels, spec.num_classes) == (2, 3)
    with pytest.raises(ValueError, match="multiple of"):
        nnunet_arch([33, 64, 64], [1.0, 1.0, 1.0])


def test_ratios_divide_by_the_reference_wherever_it_stands_and_skip_what_it_lacks():
    from nnunet_logonet.benchmark.interleaved import _add_paired_ratios
    from nnunet_logonet.benchmark.records import add_ratios

    results = {"logonet_s": {"figures": {"parameters": 40, "peak_memory_mb": 900.0, "forward_s": 1.0}},
               "nnunet": {"figures": {"parameters": 10, "peak_memory_mb": None, "forward_s": 2.0}},
               "logonet_l": {"status": "skipped"}}
    add_ratios(results)
    assert results["logonet_s"]["ratios"] == {"parameters": 4.0, "macs": None, "forward_s": 0.5,
                                              "train_step_s": None, "peak_memory_mb": None,
                                              "sliding_window_s": None}
    assert set(results["logonet_l"]["ratios"]) == set(FIGURES)
    entries = {"logonet_s": {"figures": {"forward_s": 2.0}, "samples": {"forward_s": [1.0, 2.0]}},
               "logonet_tiny": {"figures": {"forward_s": 1.0}, "samples": {"forward_s": [1.0, 1.0]}}}
    _add_paired_ratios(entries)  # no nnunet in the run: no ratios, no ranges
    assert entries["logonet_s"]["ratios"]["forward_s"] is None and entries["logonet_s"]["ratio_ranges"] == {}


def test_allocator_settings_include_preloaded_allocators(monkeypatch):
    from nnunet_logonet.benchmark.records import allocator_settings

    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator_settings() == {"MALLOC_ARENA_MAX": "2", "LD_PRELOAD": "libjemalloc.so.2"}
    info = device_info(torch.device("cpu"))
    assert info["memory_available_mb"] > 0 and info["logical_cpus"] >= 1


def test_table_prints_each_figure_in_its_unit_with_its_ratio_and_the_runs_costs():
    report = json.loads((Path(__file__).parents[1] / "docs/benchmarks/cpu_64.json").read_text())
    report["models"]["logonet_s"]["details"]["process_costs_per_call"] = {
        "train_step_s": {"minor_page_faults": 2.5e6, "system_s": 0.75}}
    report["models"]["logonet_l"] = {"spec": report["models"]["logonet_l"]["spec"], "status": "skipped",
                                     "note": "skipped: needs ~90.0 GB even for inference"}
    table = format_table(report)
    row = next(line for line in table.splitlines() if line.startswith("logonet_s "))
    assert row.split()[2:] == ["66.51", "(4.02x)", "70.6", "(1.19x)", "0.697", "(1.07x)", "5.552", "(1.42x)",
                               "3611", "(1.87x)", "6.42", "(1.23x)"]
    assert "median of 3 after 1 warm-up (sliding window: 3 after 0)" in table
    assert "(8 tiles, step 0.5" in table
    assert "logonet_l: skipped: needs ~90.0 GB" in table
    assert "logonet_s: 2.50 M minor page faults per training step (0.75 s system time)" in table

    interleaved = json.loads(
        (Path(__file__).parents[1] / "docs/benchmarks/cpu_64_epyc_zen4_interleaved.json").read_text())
    lo, hi = interleaved["models"]["logonet_s"]["ratio_ranges"]["forward_s"]
    table = format_table(interleaved)
    assert f"logonet_s: per-round ratios fwd {lo:.2f}x-{hi:.2f}x, " in table and lo < hi
    assert "nnunet: per-round" not in table


def test_runs_skip_what_the_estimate_says_cannot_fit(monkeypatch):
    from nnunet_logonet.benchmark import efficiency

    seen = {}

    def fake_measure(spec, settings, *, skip_training=None):
        seen[spec.name] = skip_training
        return {"status": "ok", "figures": {"parameters": 1.0}, "details": {}}

    estimates = {"nnunet": (100.0, 1000.0), "logonet_tiny": (100.0, 5000.0), "logonet_s": (9000.0, 20000.0)}
    monkeypatch.setattr(efficiency, "measure_model", fake_measure)
    monkeypatch.setattr(efficiency, "available_memory_mb", lambda device: 3072.0)
    monkeypatch.setattr(efficiency, "estimate_memory_mb", lambda spec, batch, device: dict(
        zip(("inference_mb", "train_mb"), estimates[spec.name])))
    specs = [resolve_model(name, patch_size=[int(p) for p in PATCH]) for name in estimates]
    settings = efficiency.default_settings(torch.device("cpu"), [int(p) for p in PATCH])
    report = efficiency.run_benchmark(specs, settings, isolate=False, progress=False)
    assert seen == {"nnunet": None, "logonet_tiny": "needs ~4.9 GB at batch 2, 3.0 GB available"}
    assert report["models"]["logonet_s"]["status"] == "skipped"
    assert "needs ~8.8 GB even for inference, 3.0 GB available" in report["models"]["logonet_s"]["note"]
    assert len(report["models"]["nnunet"]["details"]["load_average_before"]) == 3


def test_interleaved_run_times_in_rounds_skips_training_that_cannot_fit_and_writes_the_end(tmp_path, monkeypatch):
    import contextlib

    from nnunet_logonet.benchmark import interleaved
    from nnunet_logonet.benchmark.measure import default_settings

    built = {}

    class FakeModel:
        def __init__(self, spec, settings, device):
            self.spec, self.figures, self.details = spec, {"parameters": 1}, {"notes": []}
            self.kernels = lambda: contextlib.nullcontext()
            built[spec.name] = self

        def count_macs(self):
            self.figures["macs"] = 1

        def call(self, figure, settings, device):
            return lambda: None

    samples = {"nnunet": [2.0, 1.0, 4.0], "logonet_tiny": [3.0, 2.0, 4.0]}  # per round 1.5, 2, 1
    rounds_called = []

    def fake_rounds(calls, rounds, device, *, warmup=1, contexts=None):
        rounds_called.append((warmup, {name: contexts[name] for name in calls}))
        return {name: list(samples[name]) for name in calls}

    estimates = {"nnunet": 5000.0, "logonet_tiny": 100.0}  # the larger one first
    monkeypatch.setattr(interleaved, "_Model", FakeModel)
    monkeypatch.setattr(interleaved, "interleaved_rounds", fake_rounds)
    monkeypatch.setattr(interleaved, "available_memory_mb", lambda device: 3072.0)
    monkeypatch.setattr(interleaved, "estimate_memory_mb", lambda spec, batch, device: {
        "inference_mb": 10.0, "train_mb": estimates[spec.name]})
    specs = [resolve_model(name, patch_size=[int(p) for p in PATCH]) for name in estimates]
    settings = default_settings(torch.device("cpu"), [int(p) for p in PATCH])
    out = tmp_path / "interleaved.json"
    report = interleaved.run_interleaved(specs, settings, 3, json_path=out, progress=False)
    assert len(rounds_called) == 2  # forward and sliding window; no training
    for warmup, contexts in rounds_called:  # one warm-up run each, inside each model's own fast paths
        assert warmup == 1 and contexts == {name: model.kernels for name, model in built.items()}
    tiny = report["models"]["logonet_tiny"]
    assert set(tiny["samples"]) == {"forward_s", "sliding_window_s"}
    assert tiny["figures"]["forward_s"] == 3.0  # the median over rounds
    assert tiny["ratios"]["forward_s"] == 1.5 and tiny["ratio_ranges"]["forward_s"] == [1.0, 2.0]
    assert "training not run: the largest model needs ~4.9 GB at batch 2, 3.0 GB available" in tiny["details"]["notes"]
    assert "load_average_end" in json.loads(out.read_text())["device_info"]
