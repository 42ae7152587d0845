"""Files and folders written whole or not at all, and what killed runs left behind.

The phantom writer and ``logonet_prepare_unlabeled`` write a dataset into
``.<target>.<pid>-XXXXXXXX.<suffix>`` next to it and rename it into place when complete, so an
interrupted run never leaves a half-written dataset. SIGKILL (and SIGTERM, unless the command
exits through :func:`exit_cleanly_on_sigterm`) skips their cleanup; the pid in the name lets the
next run remove exactly the folders whose process is gone. Single files (records, plans copies,
reports) go through :func:`write_whole` and its text/JSON/copy forms: a temporary file beside the
target, renamed over it, so a kill leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["process_running", "new_work_folder", "new_work_file", "remove_stale_work_folders",
           "remove_stale_work_files", "remove_stale_pid_temporaries", "write_whole", "write_text_whole",
           "write_json_whole", "copy_file_whole", "swap_into_place", "delete_folder", "last_written",
           "read_json_if_whole", "exit_cleanly_on_sigterm", "LockHeldError", "exclusive_lock"]


class LockHeldError(RuntimeError):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file (``pid N``)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike):
    """Hold ``path`` (an advisory ``flock``, its file holding ``pid N``) for the block, or raise
    :class:`LockHeldError` at once when another process holds it. The kernel releases it when the process
    ends, however it ends, so a killed run leaves no stale lock. No lock where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockHeldError(path, handle.read().strip() or "a process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs on this machine (where that cannot be asked, assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def new_work_folder(root: Path, target: str, suffix: str) -> Path:
    """A new hidden ``.<target>.<pid>-XXXXXXXX.<suffix>`` folder in ``root``."""
    return Path(tempfile.mkdtemp(prefix=f".{target}.{os.getpid()}-", suffix=f".{suffix}", dir=root))


def new_work_file(root: Path, target: str, suffix: str) -> Path:
    """A new empty hidden ``.<target>.<pid>-XXXXXXXX.<suffix>`` file in ``root``, with the permissions
    a plain ``open`` gives (``mkstemp`` makes files readable by their owner only, and a rename keeps that)."""
    handle, name = tempfile.mkstemp(prefix=f".{target}.{os.getpid()}-", suffix=f".{suffix}", dir=root)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def _stale_work_paths(root: Path, target: str, suffix: str):
    pattern = re.compile(rf"^\.{re.escape(target)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.{re.escape(suffix)}$")
    for path in root.iterdir() if root.is_dir() else ():
        match = pattern.match(path.name)
        if match and not (match[1] and process_running(int(match[1]))):
            yield path


def remove_stale_work_folders(root: Path, target: str, suffix: str) -> None:
    """Delete ``target``'s work folders in ``root`` whose process is gone (or that carry no pid:
    written before pids were recorded); other targets' and live runs' folders are left alone."""
    for path in _stale_work_paths(root, target, suffix):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_work_files(root: Path, target: str, suffix: str) -> None:
    """Delete ``target``'s work files (``new_work_file``) in ``root`` whose process is gone."""
    for path in _stale_work_paths(root, target, suffix):
        if path.is_file():
            path.unlink(missing_ok=True)


def remove_stale_pid_temporaries(path: str | os.PathLike, marker: str = ".tmp") -> None:
    """Delete ``<path><marker><pid>`` files whose process is gone: what a save killed between writing
    its temporary file and renaming it left (a checkpoint's can be hundreds of MB)."""
    path = Path(path)
    pattern = re.compile(rf"^{re.escape(path.name + marker)}(\d+)$")
    for candidate in path.parent.iterdir() if path.parent.is_dir() else ():
        match = pattern.match(candidate.name)
        if match and int(match[1]) != os.getpid() and not process_running(int(match[1])) and candidate.is_file():
            candidate.unlink(missing_ok=True)


def write_whole(filename: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary)``, then rename the temporary file to ``filename`` (nothing when ``write``
    wrote nothing, as nnU-Net's checkpoint save on ranks other than 0). First removes what a write killed
    before its rename left (``<filename>.tmp<pid>``: hundreds of MB for a LoGoNet-S checkpoint); a failing
    ``write`` removes its own temporary file and leaves ``filename`` as it was."""
    filename = os.fspath(filename)
    remove_stale_pid_temporaries(filename)
    tmp = f"{filename}.tmp{os.getpid()}"
    try:
        write(tmp)
        if os.path.isfile(tmp):
            os.replace(tmp, filename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_whole(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` (its folder is made if needed), written whole or not at all (:func:`write_whole`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda tmp: Path(tmp).write_text(text))


def write_json_whole(path: str | os.PathLike, data: Any, *, indent: int = 2, **dumps_kwargs: Any) -> None:
    """``data`` as indented JSON (plus a final newline) in ``path``, written whole or not at all."""
    write_text_whole(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


def copy_file_whole(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``shutil.copyfile(source, target)``, with ``target`` written whole or not at all."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    write_whole(target, lambda tmp: shutil.copyfile(source, tmp))


def swap_into_place(work: Path, final: Path) -> None:
    """Rename the complete folder ``work`` to ``final``, replacing what is there.

    An existing ``final`` is first moved into a hidden ``old`` work folder beside it; an interrupt
    before the new folder is in place moves it back, so ``final`` is never missing. Deleting the
    old copy comes last: an interrupt there leaves the swap done and the rest of the old copy to
    ``remove_stale_work_folders(root, final.name, "old")`` of the next run. A SIGKILL between the two
    renames leaves ``final`` missing and its old copy aside: the next swap first puts that copy back.
    """
    root = final.parent
    for stale in _stale_work_paths(root, final.name, "old"):
        if not final.exists() and (stale / final.name).exists():
            os.replace(stale / final.name, final)
    remove_stale_work_folders(root, final.name, "old")
    if not final.exists():
        os.replace(work, final)
        return
    old = new_work_folder(root, final.name, "old")
    try:
        os.replace(final, old / final.name)
        os.replace(work, final)
    except BaseException:
        if not final.exists() and (old / final.name).exists():
            os.replace(old / final.name, final)
        shutil.rmtree(old, ignore_errors=True)
        raise
    try:
        # first out of the name the restore above looks for: a copy cut short by this deletion is never put back
        os.replace(old / final.name, old / "deleting")
        shutil.rmtree(old, ignore_errors=True)
    except KeyboardInterrupt:  # the new folder is in place; what is left of the old goes next run
        pass


def delete_folder(folder: Path) -> None:
    """Delete ``folder`` whole or not at all: it is first renamed to a hidden work folder beside it, so an
    interrupt leaves it complete (marker included) or out of the way, never half-deleted under its name.
    What an interrupted deletion left aside is removed by the next call for the same name."""
    folder = Path(folder)
    remove_stale_work_folders(folder.parent, folder.name, "deleting")
    if not folder.exists():
        return
    try:
        aside = new_work_folder(folder.parent, folder.name, "deleting")
    except OSError:  # a parent we may not write to: delete in place, as before
        shutil.rmtree(folder)
        return
    try:
        os.replace(folder, aside / folder.name)
    except OSError:  # a mount point, another file system: delete in place, as before
        aside.rmdir()
        shutil.rmtree(folder)
        return
    shutil.rmtree(aside)


def last_written(path: str | os.PathLike) -> float:
    """``path``'s modification time, ``inf`` for a missing file: a missing *source* then counts as written
    just now, so nothing made from it is taken as up to date (compare a missing *output* by its presence)."""
    try:
        return Path(path).stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing part of ``path`` (itself or a folder above it) when that is a file, so that
    ``path`` can be neither a folder nor a file inside one; None otherwise."""
    path = Path(path).absolute()
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def output_file_argument(value: str) -> str:
    """An ``argparse`` type for a file a command writes at its end (``--json``): checked when it starts, not
    after a run of minutes. Refused: an empty name, a folder, a path below a file. Missing folders are fine
    (they are created)."""
    import argparse

    path = Path(value)
    if not value or path.name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"{value!r} is not a file name; give one such as results.json")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder; give a file name such as {path / 'results.json'}")
    blocking = file_in_the_way(path.absolute().parent)
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{value!r}: {blocking} is a file, so nothing can be written below it")
    return value


def read_json_if_whole(path: str | os.PathLike) -> dict | None:
    """``path``'s JSON, or None when there is no such file or it is not valid JSON: nnU-Net writes its
    fingerprint and plans in place, so a run killed while writing leaves half a file."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def exit_cleanly_on_sigterm() -> None:
    """``kill`` and ``timeout`` send SIGTERM, which ends Python without running ``finally`` blocks;
    exit through them instead (for console scripts, not for library calls)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
