"""Checkpoints written whole or not at all.

nnU-Net's ``save_checkpoint`` writes ``checkpoint_latest.pth`` in place with ``torch.save``; a run
killed while it writes leaves a file ``torch.load`` cannot read, and every ``--c`` after that fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from nnunet_logonet.workfolders import remove_stale_pid_temporaries

__all__ = ["AtomicCheckpoints", "write_whole"]


def write_whole(filename: str, write: Callable[[str], None]) -> None:
    """``write(temporary)``, then rename the temporary file to ``filename`` (nothing when ``write``
    wrote nothing, as nnU-Net's save on ranks other than 0); first removes what a save killed before
    its rename left (``<filename>.tmp<pid>``, hundreds of MB for LoGoNet-S)."""
    remove_stale_pid_temporaries(filename)
    tmp = f"{filename}.tmp{os.getpid()}"
    try:
        write(tmp)
        if os.path.isfile(tmp):
            os.replace(tmp, filename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpoints:
    """Mixin for an ``nnUNetTrainer``: its ``save_checkpoint`` goes through :func:`write_whole`."""

    def save_checkpoint(self, filename: str) -> None:
        write_whole(filename, super().save_checkpoint)
