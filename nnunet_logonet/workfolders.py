"""Hidden work folders beside a dataset being written, and the ones killed runs left behind.

The phantom writer and ``logonet_prepare_unlabeled`` write a dataset into
``.<target>.<pid>-XXXXXXXX.<suffix>`` next to it and rename it into place when complete, so an
interrupted run never leaves a half-written dataset. SIGKILL (and SIGTERM, unless the command
exits through :func:`exit_cleanly_on_sigterm`) skips their cleanup; the pid in the name lets the
next run remove exactly the folders whose process is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

__all__ = ["process_running", "new_work_folder", "remove_stale_work_folders", "exit_cleanly_on_sigterm"]


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


def remove_stale_work_folders(root: Path, target: str, suffix: str) -> None:
    """Delete ``target``'s work folders in ``root`` whose process is gone (or that carry no pid:
    written before pids were recorded); other targets' and live runs' folders are left alone."""
    pattern = re.compile(rf"^\.{re.escape(target)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.{re.escape(suffix)}$")
    for path in root.iterdir() if root.is_dir() else ():
        match = pattern.match(path.name)
        if match and path.is_dir() and not (match[1] and process_running(int(match[1]))):
            shutil.rmtree(path, ignore_errors=True)


def exit_cleanly_on_sigterm() -> None:
    """``kill`` and ``timeout`` send SIGTERM, which ends Python without running ``finally`` blocks;
    exit through them instead (for console scripts, not for library calls)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
