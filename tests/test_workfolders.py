"""Replacing a dataset folder: never missing, never half-written, leftovers removed by the next run."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nnunet_logonet import workfolders
from nnunet_logonet.workfolders import new_work_file, new_work_folder, swap_into_place


def dataset(root, name, marker):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(marker)
    return folder


def hidden(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_swap_replaces_an_existing_folder_and_leaves_nothing_beside_it(tmp_path):
    final = dataset(tmp_path, "Dataset001_X", "old")
    work = new_work_folder(tmp_path, final.name, "partial")
    (work / "dataset.json").write_text("new")
    swap_into_place(work, final)
    assert (final / "dataset.json").read_text() == "new" and hidden(tmp_path) == []


def test_interrupt_before_the_new_folder_is_in_place_puts_the_old_one_back(tmp_path, monkeypatch):
    final = dataset(tmp_path, "Dataset001_X", "old")
    work = new_work_folder(tmp_path, final.name, "partial")
    (work / "dataset.json").write_text("new")
    real_replace, calls = os.replace, []

    def interrupted_replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(workfolders.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        swap_into_place(work, final)
    monkeypatch.undo()
    assert (final / "dataset.json").read_text() == "old"
    assert [p for p in hidden(tmp_path) if p.endswith(".old")] == []


def test_interrupt_while_deleting_the_old_copy_keeps_the_new_folder_and_the_next_swap_removes_the_rest(
        tmp_path, monkeypatch):
    final = dataset(tmp_path, "Dataset001_X", "first")
    work = new_work_folder(tmp_path, final.name, "partial")
    (work / "dataset.json").write_text("second")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while a large old dataset is being deleted

    monkeypatch.setattr(workfolders.shutil, "rmtree", interrupted_rmtree)
    swap_into_place(work, final)  # the swap is done: no error for an interrupt that came after it
    monkeypatch.setattr(workfolders.shutil, "rmtree", real_rmtree)
    assert (final / "dataset.json").read_text() == "second"
    (leftover,) = hidden(tmp_path)
    assert leftover.endswith(".old")
    # what is left is out of the name a later swap restores from: a copy this deletion cut short is never put back
    assert not (tmp_path / leftover / final.name).exists()
    # a later run's folder name carries a pid that is gone by then: simulate with a pid above pid_max
    os.rename(tmp_path / leftover, tmp_path / f".{final.name}.99999999-abcd_123.old")
    work = new_work_folder(tmp_path, final.name, "partial")
    (work / "dataset.json").write_text("third")
    swap_into_place(work, final)
    assert (final / "dataset.json").read_text() == "third" and hidden(tmp_path) == []


def test_a_swap_killed_between_its_renames_gets_its_old_folder_back_first(tmp_path, monkeypatch):
    """SIGKILL after the old folder went aside and before the new one came: the next swap restores it
    before it replaces it (the old copy was deleted unseen before)."""
    final = dataset(tmp_path, "Dataset001_X", "old")
    aside = tmp_path / f".{final.name}.99999999-abcd_123.old"  # the killed run's pid is gone
    aside.mkdir()
    os.replace(final, aside / final.name)
    restored = []
    real_replace = os.replace

    def watch(src, dst):
        if Path(dst) == final and Path(src) == aside / final.name:
            restored.append((Path(src) / "dataset.json").read_text())
        return real_replace(src, dst)

    monkeypatch.setattr(workfolders.os, "replace", watch)
    work = new_work_folder(tmp_path, final.name, "partial")
    (work / "dataset.json").write_text("new")
    swap_into_place(work, final)
    assert restored == ["old"]
    assert (final / "dataset.json").read_text() == "new" and hidden(tmp_path) == []


@pytest.mark.parametrize("writer", ["text", "json", "copy"])
def test_single_files_are_written_whole_or_left_as_they_were(tmp_path, monkeypatch, writer):
    """Records, plans copies, reports and label copies: a write that fails midway (here: a value JSON
    cannot hold, a source that is gone, an interrupt) leaves the previous file and no temporary one."""
    from nnunet_logonet.workfolders import copy_file_whole, write_json_whole, write_text_whole

    target = tmp_path / "sub" / "record.json"
    target.parent.mkdir()
    target.write_text("previous")
    (tmp_path / "sub" / "record.json.tmp99999999").write_text("left by a killed run")
    with pytest.raises((TypeError, FileNotFoundError, KeyboardInterrupt)):
        if writer == "json":
            write_json_whole(target, {"a": object()})
        elif writer == "copy":
            copy_file_whole(tmp_path / "missing.nii.gz", target)
        else:
            def torn_write(self, data, *args, **kwargs):
                with open(self, "w") as f:
                    f.write(data[:3])
                raise KeyboardInterrupt

            with monkeypatch.context() as patch:
                patch.setattr(Path, "write_text", torn_write)
                write_text_whole(target, "the new text")
    assert target.read_text() == "previous" and not (target.parent / f"record.json.tmp{os.getpid()}").exists()
    write_text_whole(target, "whole")  # the next write also removes what the killed run left
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"] and target.read_text() == "whole"
    target.write_text("previous")
    new = tmp_path / "new" / "deeper" / "record.json"  # folders made as needed
    if writer == "json":
        write_json_whole(new, {"a": 1})
        assert new.read_text() == '{\n  "a": 1\n}\n'
    elif writer == "copy":
        copy_file_whole(target, new)
        assert new.read_text() == "previous"
    else:
        write_text_whole(new, "text")
        assert new.read_text() == "text"


def test_a_folder_is_deleted_whole_and_what_an_interrupt_left_aside_goes_next_time(tmp_path, monkeypatch):
    """--fresh deleted datasets with rmtree(ignore_errors=True): Ctrl-C midway left half a dataset under its own
    name, perhaps without the marker that proves the demo made it. Now the name is free at once or not at all."""
    from nnunet_logonet.workfolders import delete_folder

    folder = dataset(tmp_path, "Dataset950_Demo", "marker")
    (folder / "imagesTr").mkdir()
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workfolders.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        delete_folder(folder)
    monkeypatch.setattr(workfolders.shutil, "rmtree", real_rmtree)
    assert not folder.exists()
    (leftover,) = hidden(tmp_path)
    assert leftover.endswith(".deleting") and (tmp_path / leftover / folder.name / "dataset.json").is_file()
    os.rename(tmp_path / leftover, tmp_path / f".{folder.name}.99999999-abcd_123.deleting")  # its run is gone
    folder = dataset(tmp_path, "Dataset950_Demo", "again")
    delete_folder(folder)
    assert list(tmp_path.iterdir()) == []
    delete_folder(folder)  # nothing there: nothing to do


def test_a_folder_that_cannot_be_renamed_aside_is_deleted_in_place(tmp_path, monkeypatch):
    """A mount point or another file system (EXDEV, EBUSY): the rename fails, the folder is deleted as before."""
    import errno

    from nnunet_logonet.workfolders import delete_folder

    folder = dataset(tmp_path, "work", "marker")

    def cannot_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(workfolders.os, "replace", cannot_rename)
    delete_folder(folder)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save_and_a_live_ones_kept(tmp_path):
    from nnunet_logonet.workfolders import remove_stale_pid_temporaries

    checkpoint = tmp_path / "checkpoint_best.pth"
    gone = tmp_path / "checkpoint_best.pth.tmp99999999"
    live = tmp_path / f"checkpoint_best.pth.tmp{os.getpid()}"
    other = tmp_path / "checkpoint_final.pth.tmp99999999"
    for path in (checkpoint, gone, live, other):
        path.write_bytes(b"x")
    remove_stale_pid_temporaries(checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.name, live.name, other.name])


@pytest.mark.parametrize("trainer", ["LoGoNetTrainer", "nnUNetTrainer_demo"])
def test_checkpoints_are_written_whole_and_a_killed_saves_leftover_is_removed(tmp_path, monkeypatch, trainer):
    """nnU-Net's save_checkpoint writes in place: the demo's baseline killed while saving left a
    checkpoint_latest.pth that torch.load cannot read, and every --c failed. A failed save now leaves the
    previous checkpoint as it was, and a save killed before its rename (``.tmp<pid>``, hundreds of MB for
    LoGoNet-S) is removed by the next save."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_logonet.training.baseline import nnUNetTrainer_demo
    from nnunet_logonet.training.trainer import LoGoNetTrainer

    cls = {"LoGoNetTrainer": LoGoNetTrainer, "nnUNetTrainer_demo": nnUNetTrainer_demo}[trainer]

    def torn_save(self, name):
        with open(name, "wb") as f:
            f.write(b"half a chec")
        raise KeyboardInterrupt

    checkpoint = tmp_path / "checkpoint_latest.pth"
    checkpoint.write_bytes(b"the previous checkpoint")
    (tmp_path / "checkpoint_latest.pth.tmp99999999").write_bytes(b"left by a killed save")
    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", torn_save)
    with pytest.raises(KeyboardInterrupt):
        cls.save_checkpoint(object.__new__(cls), str(checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]
    assert checkpoint.read_bytes() == b"the previous checkpoint"
    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", lambda self, name: Path(name).write_bytes(b"new"))
    cls.save_checkpoint(object.__new__(cls), str(checkpoint))
    assert checkpoint.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]


def test_work_files_get_the_permissions_of_a_plain_open(tmp_path):
    umask = os.umask(0o027)
    try:
        path = new_work_file(tmp_path, "clusterers.npz", "tmp")
    finally:
        os.umask(umask)
    assert path.name.startswith(f".clusterers.npz.{os.getpid()}-") and path.stat().st_mode & 0o777 == 0o640


def test_a_process_of_another_user_counts_as_running(monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: its work files must stay."""
    def not_permitted(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(workfolders.os, "kill", not_permitted)
    assert workfolders.process_running(1)

    def gone(pid, signal):
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(workfolders.os, "kill", gone)
    assert not workfolders.process_running(1)


def test_a_write_that_writes_nothing_leaves_nothing(tmp_path):
    """nnU-Net's checkpoint save writes only on rank 0: the other ranks' whole-file write must do nothing."""
    workfolders.write_whole(tmp_path / "checkpoint.pth", lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_source_counts_as_written_just_now(tmp_path):
    """Nothing made from a missing file may look up to date, so its time is later than any file's."""
    (tmp_path / "made").write_text("x")
    assert workfolders.last_written(tmp_path / "missing") == float("inf")
    assert workfolders.last_written(tmp_path / "missing") > workfolders.last_written(tmp_path / "made")


def test_a_lock_names_its_holder_and_goes_with_a_killed_process(tmp_path):
    """``exclusive_lock`` (logonet_plan_and_preprocess per dataset, logonet_demo per base): a second holder is
    refused at once, told the first one's pid; a SIGKILL, which runs no cleanup, leaves no stale lock."""
    import signal
    import subprocess
    import sys

    from nnunet_logonet.workfolders import LockHeldError, exclusive_lock

    lock = tmp_path / "folder" / ".dataset.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from nnunet_logonet.workfolders import exclusive_lock\n"
                               f"with exclusive_lock({str(lock)!r}):\n"
                               "    print('held', flush=True)\n"
                               "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError) as error:
            with exclusive_lock(lock):
                pass
        assert error.value.holder == f"pid {holder.pid}" and error.value.path == lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_lock(lock):
        assert lock.read_text() == f"pid {os.getpid()}\n"
