"""Checkpoints written whole or not at all.

nnU-Net's ``save_checkpoint`` writes ``checkpoint_latest.pth`` in place with ``torch.save``; a run
killed while it writes leaves a file ``torch.load`` cannot read, and every ``--c`` after that fails.
"""

from __future__ import annotations

from nnunet_logonet.workfolders import write_whole

__all__ = ["AtomicCheckpoints"]


class AtomicCheckpoints:
    """Mixin for an ``nnUNetTrainer``: its ``save_checkpoint`` goes through :func:`write_whole`."""

    def save_checkpoint(self, filename: str) -> None:
        write_whole(filename, super().save_checkpoint)
