"""Package wiring: logonet_env, the trainers folder nnU-Net searches, wheel contents."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nnunet_logonet.env import environment, trainers_folder

REPO = Path(__file__).resolve().parents[1]


def test_defaults_go_under_base_and_set_values_are_kept(tmp_path):
    env = environment(tmp_path / "data", environ={"nnUNet_results": "/somewhere/results"})
    assert env["nnUNet_raw"] == str((tmp_path / "data" / "nnUNet_raw").resolve())
    assert env["nnUNet_preprocessed"] == str((tmp_path / "data" / "nnUNet_preprocessed").resolve())
    assert env["nnUNet_results"] == "/somewhere/results"


def test_a_relative_folder_already_set_is_exported_absolute(tmp_path, monkeypatch, capsys):
    """nnU-Net reads a relative nnUNet_raw from wherever each command runs: exported as the folder it names here."""
    from nnunet_logonet.env import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("nnUNet_raw", "my raw")
    monkeypatch.setenv("nnUNet_results", "/somewhere/results")
    main(["--base", "data"])
    shown = capsys.readouterr()
    assert f"export nnUNet_raw={shlex.quote(str(tmp_path / 'my raw'))}" in shown.out.splitlines()
    assert "export nnUNet_results=/somewhere/results" in shown.out.splitlines()
    assert shown.err == (f"logonet_env: nnUNet_raw=my raw is relative, so each command would look for it in the "
                         f"folder it runs in; exported as {tmp_path / 'my raw'}\n")


def test_ext_trainer_points_at_thin_trainer_modules_and_keeps_other_folders():
    env = environment(environ={"nnUNet_extTrainer": "/my/trainers"})
    folders = env["nnUNet_extTrainer"].split(os.pathsep)
    assert folders == [str(trainers_folder()), "/my/trainers"]
    assert (trainers_folder() / "logonet_trainers.py").is_file()


def test_nnunet_finds_our_trainer_through_ext_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_logonet.training.trainer import LoGoNetTrainer

    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_folder()))
    found = recursive_find_trainer_class_by_name("LoGoNetTrainer")
    # the thin module re-exports the class of the installed package: pickling and checkpoints work
    assert found is LoGoNetTrainer
    assert found.__module__ == "nnunet_logonet.training.trainer"


def test_our_folder_is_listed_once_when_ext_trainer_already_has_it():
    """Re-running eval "$(logonet_env)" in the same shell must not grow nnUNet_extTrainer each time."""
    ours = str(trainers_folder())
    env = environment(environ={"nnUNet_extTrainer": os.pathsep.join(["/my/trainers", ours])})
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [ours, "/my/trainers"]
    again = environment(environ={"nnUNet_extTrainer": env["nnUNet_extTrainer"]})
    assert again["nnUNet_extTrainer"] == env["nnUNet_extTrainer"]


def test_base_under_home_is_expanded(tmp_path, monkeypatch):
    """--base ~/data means the home folder's data (the shell does not expand ``--base=~/data``), not a folder
    named '~' under the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    env = environment("~/d", {})
    assert env["nnUNet_raw"] == str((tmp_path / "d" / "nnUNet_raw").resolve())
    assert env["nnUNet_raw"].startswith(str(Path.home().resolve()))


def test_mkdir_creates_the_three_data_folders(tmp_path, monkeypatch, capsys):
    """logonet_env --mkdir (README quick start) creates the folders, so nnU-Net's commands find them."""
    from nnunet_logonet.env import NNUNET_FOLDERS, main

    for name in NNUNET_FOLDERS:
        monkeypatch.delenv(name, raising=False)
    main(["--base", str(tmp_path / "data"), "--mkdir"])
    capsys.readouterr()
    assert all((tmp_path / "data" / name).is_dir() for name in NNUNET_FOLDERS)


@pytest.mark.parametrize("base", ["data", "my data"])
def test_logonet_env_output_evaluates_in_a_shell(tmp_path, base):
    """The printed exports are quoted: a base folder with a space still gives the right values after eval."""
    tmp_path = tmp_path / base
    out = subprocess.run([sys.executable, "-m", "nnunet_logonet.env", "--base", str(tmp_path)],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}).stdout
    script = out + '\necho "$nnUNet_raw|$nnUNet_extTrainer"\n'
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    raw, ext = shown.split("|")
    assert raw == str(tmp_path.resolve() / "nnUNet_raw")
    assert Path(ext) == trainers_folder()
    assert all(line.startswith("export ") and shlex.split(line) for line in out.splitlines())


def test_a_base_that_cannot_hold_the_folders_is_refused_before_any_export(tmp_path, monkeypatch, capsys):
    """`--base FILE` printed exports into a file (and with --mkdir crashed with a traceback); `--base ""` meant the
    current folder without a word. Each is refused naming the path; nothing is printed for eval to run."""
    from nnunet_logonet.env import NNUNET_FOLDERS, main

    for name in NNUNET_FOLDERS:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a_file").write_text("x")
    for argv, message in ((["--base", str(tmp_path / "a_file")], "a_file is a file, so"),
                          (["--base", str(tmp_path / "a_file" / "data"), "--mkdir"], "a_file is a file, so"),
                          (["--base", ""], "--base is empty")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        captured = capsys.readouterr()
        assert stop.value.code == 2 and message in captured.err and captured.out == ""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "a_file"))
    with pytest.raises(SystemExit):
        main(["--base", str(tmp_path / "data")])
    assert f"nnUNet_raw (already set): {tmp_path / 'a_file'} is a file, not a folder" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_raw")

    def denied(self, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(SystemExit):
        main(["--base", str(tmp_path / "data"), "--mkdir"])
    captured = capsys.readouterr()
    assert "cannot create" in captured.err and "Permission denied" in captured.err and captured.out == ""


def test_unknown_flag_is_refused():
    proc = subprocess.run([sys.executable, "-m", "nnunet_logonet.env", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_wheel_ships_trainers_and_planners_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("nnunet_logonet-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nnunet_logonet/trainers/logonet_trainers.py" in names
    assert "nnunet_logonet/planners/logonet_planners.py" in names
    assert "nnunet_logonet/network/logonet.py" in names
    assert not any(n.startswith(("trainers/", "planners/", "tests/")) for n in names)
    # every module of the source tree is in the wheel (a package missing from setup.cfg's explicit
    # list would only show up as an ImportError after a regular install)
    source = {str(p.relative_to(REPO)) for p in (REPO / "nnunet_logonet").rglob("*.py")}
    missing = sorted(s for s in source if s not in names)
    assert not missing, f"add their packages to setup.cfg [options] packages: {missing}"


#: every trainer README.md and docs/ssl.md tell users to pass as -tr, with the epochs its name promises
ADVERTISED_TRAINERS = {
    "LoGoNetTrainer": None, "LoGoNetTrainer_1epoch": 1, "LoGoNetTrainer_5epochs": 5, "LoGoNetTrainer_10epochs": 10,
    "LoGoNetTrainer_50epochs": 50, "LoGoNetTrainer_100epochs": 100, "LoGoNetTrainer_paperRecipe": None,
    "LoGoNetTrainer_paperRecipe_1epoch": 1, "LoGoNetTrainer_paperRecipe_100epochs": 100,
    "ULKANetTrainer": None, "ULKANetTrainer_1epoch": 1, "ULKANetTrainer_5epochs": 5, "ULKANetTrainer_10epochs": 10,
    "ULKANetTrainer_100epochs": 100,
    "LoGoNetSSLTrainer": None, "LoGoNetSSLTrainer_10epochs": 10, "LoGoNetSSLTrainer_100epochs": 100,
}


def test_every_advertised_trainer_is_found_by_nnunet_with_the_epochs_its_name_gives(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_logonet.training.ssl_trainer import LoGoNetSSLTrainer
    from nnunet_logonet.training.trainer import LoGoNetTrainer, ULKANetTrainer

    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_folder()))
    readme = (REPO / "README.md").read_text() + (REPO / "docs" / "ssl.md").read_text()
    bases = (LoGoNetTrainer, ULKANetTrainer, LoGoNetSSLTrainer)
    for base in bases:  # the budget variants' own settings, without nnU-Net's plans-driven set-up
        monkeypatch.setattr(base, "__init__", lambda self, *args, **kwargs: setattr(self, "num_epochs", 1000))
    for name, epochs in ADVERTISED_TRAINERS.items():
        assert name in readme or name.rsplit("_", 1)[-1] in readme, name
        found = recursive_find_trainer_class_by_name(name)
        assert found is not None and found.__name__ == name and issubclass(found, LoGoNetTrainer), name
        trainer = object.__new__(found)
        found.__init__(trainer, {}, "3d_fullres", 0, {})
        assert trainer.num_epochs == (epochs or 1000), name
    assert recursive_find_trainer_class_by_name("LoGoNetTrainer_paperRecipe").recipe == "paper"
    assert recursive_find_trainer_class_by_name("LoGoNetTrainer_paperRecipe_1epoch").recipe == "paper"
    assert issubclass(recursive_find_trainer_class_by_name("ULKANetTrainer_1epoch"), ULKANetTrainer)
    assert issubclass(recursive_find_trainer_class_by_name("ULKANetTrainer_10epochs"), ULKANetTrainer)
    assert issubclass(recursive_find_trainer_class_by_name("LoGoNetSSLTrainer_100epochs"), LoGoNetSSLTrainer)


def _path_with_a_disk_of(tmp_path: Path, free_kib: int) -> str:
    """PATH whose ``df`` reports ``free_kib`` KiB available on every file system."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/vdz 262144000 1000 {free_kib} 1% /'\n")
    df.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_a_first_install_on_a_disk_too_full_for_pytorch_is_refused_before_anything_is_written(tmp_path):
    """pip stops half-way with "No space left on device" when the disk cannot hold PyTorch's CUDA build (a
    fresh clone's CI hit it): the set-up says so first, naming the folder, the free space and the fix."""
    venv = tmp_path / "a disk" / "venv"
    env = {**os.environ, "LOGONET_VENV": str(venv), "PATH": _path_with_a_disk_of(tmp_path, 3 * 1024 * 1024)}
    refused = subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), "--co"], capture_output=True, text=True,
                             env=env, cwd="/", timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"install into {venv}: its file system ({tmp_path}) has 3.0 GiB free" in refused.stderr
    assert "7 GiB are needed" in refused.stderr and "LOGONET_VENV=" in refused.stderr
    assert not (tmp_path / "a disk").exists() and "[setup] creating" not in refused.stdout


def test_readme_demo_command_sets_up_and_hands_its_arguments_to_logonet_demo(tmp_path):
    """``bash scripts/demo.sh`` (README's main-job command): the set-up finds the installed environment and
    execs ``logonet_demo`` with the arguments given, on a nearly full disk too (only a first install needs room).
    Run against this test run's own environment, only where that environment was made by the set-up (its stamp
    matches): elsewhere the script would reinstall it."""
    import hashlib

    import pytest

    venv = Path(sys.prefix)
    want = hashlib.sha256((REPO / "setup.cfg").read_bytes() + (REPO / "pyproject.toml").read_bytes()).hexdigest()
    stamp = venv / ".logonet-install-stamp"
    if not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.skip(f"{venv} was not set up by scripts/setup_env.sh for this setup.cfg (no matching {stamp.name})")
    env = {**os.environ, "LOGONET_VENV": str(venv), "PATH": _path_with_a_disk_of(tmp_path, 1024)}
    shown = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--help"], capture_output=True, text=True,
                           env=env, cwd="/", timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"[setup] reusing {venv}" in shown.stdout and "usage: logonet_demo" in shown.stdout
    refused = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--no-such-flag"], capture_output=True,
                             text=True, env=env, cwd="/", timeout=120)
    assert refused.returncode == 2 and "--no-such-flag" in refused.stderr
