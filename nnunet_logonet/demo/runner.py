"""Run one nnU-Net command: its whole output to a log file, its cost measured, its lines watchable.

A rerun of a stage (a resumed demo) appends to the stage's log, each attempt under its own header line
with its start time, so an interrupted or failed attempt's output stays readable after the rerun.

Costs come from the kernel (``os.wait4``): wall time, CPU seconds and peak resident set of the
command (its largest process; nnU-Net's data-augmentation workers are separate processes). The
CPU seconds say what a run costs independently of how busy a shared machine is.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nnunet_logonet.demo.settings import DemoError

__all__ = ["CommandResult", "run_command"]

TAIL_LINES = 25


@dataclass
class CommandResult:
    """What :func:`run_command` measured of one finished command, and where its log is."""

    command: list[str]
    log: str
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    #: (seconds since start, line) for every line the ``watch`` callback kept
    events: list[tuple[float, str]] = field(default_factory=list)


def run_command(command: Sequence[str], *, env: dict[str, str], log: str | os.PathLike,
                watch: Callable[[str], bool] | None = None, on_line: Callable[[str], None] | None = None,
                cwd: str | os.PathLike | None = None) -> CommandResult:
    """Run ``command``; raise :class:`DemoError` with the log's last lines if it fails.

    ``watch(line)`` returning True keeps the line with its time stamp (``events``); ``on_line`` sees
    every line (progress bars). The child's output is unbuffered so time stamps are accurate.
    """
    command = [str(c) for c in command]
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**env, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    events: list[tuple[float, str]] = []
    start = time.perf_counter()
    lock = threading.Lock()  # the log is closed under it on Ctrl-C, while the pump may be writing
    earlier_attempt = log.is_file() and log.stat().st_size > 0
    with open(log, "a", encoding="utf-8") as handle:
        if earlier_attempt:
            handle.write("\n")
        handle.write(f"# {datetime.now().astimezone().isoformat(timespec='seconds')}\n$ {shlex.join(command)}\n")
        handle.flush()
        try:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        except FileNotFoundError as error:
            raise DemoError(f"{command[0]} not found on PATH ({error}); activate the environment that has "
                            f"nnunet-logonet installed (bash scripts/demo.sh does).") from error

        def pump() -> None:
            # newline="": carriage returns of progress bars are kept in the log as they were written
            for line in io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline=""):
                with lock:
                    if handle.closed:  # interrupted: the command's workers may still hold its output pipe
                        return
                    handle.write(line)
                    handle.flush()  # the log can be followed with tail -f while the command runs
                stripped = line.rstrip("\r\n")
                tail.append(stripped)
                if watch is not None and watch(stripped):
                    events.append((time.perf_counter() - start, stripped))
                if on_line is not None:
                    on_line(stripped)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through exit_cleanly_on_sigterm
            process.terminate()
            process.wait()
            with lock:
                handle.write("\n# interrupted\n")
                handle.close()  # the pump ends at its next line instead of writing to a closed file
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        lines = "\n    ".join(tail)
        raise DemoError(f"`{shlex.join(command)}` failed (exit {process.returncode}) after {wall:.0f} s. Last lines of "
                        f"{log}:\n    {lines}")
    return CommandResult(command=command, log=str(log), wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                         max_rss_mb=usage.ru_maxrss / 1024.0, events=events)
