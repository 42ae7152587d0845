"""Checkpoints written whole or not at all.

nnU-Net's ``save_checkpoint`` writes ``checkpoint_latest.pth`` in place with ``torch.save``; a run
killed while it writes leaves a file ``torch.load`` cannot read, and every ``--c`` after that fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnunet_logonet.workfolders import remove_stale_pid_temporaries

__all__ = ["AtomicCheckpoints"]


class AtomicCheckpoints:
    """Mixin for an ``nnUNetTrainer``: its ``save_checkpoint`` writes to ``<file>.tmp<pid>`` and renames,
    and removes what a save killed before its rename left."""

    def save_checkpoint(self, filename: str) -> None:
        remove_stale_pid_temporaries(filename)
        tmp = f"{filename}.tmp{os.getpid()}"
        try:
            super().save_checkpoint(tmp)  # nnU-Net writes on rank 0 only
            if os.path.isfile(tmp):
                os.replace(tmp, filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
