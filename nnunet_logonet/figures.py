"""Writing matplotlib figures so that an interrupted or failed save never leaves a broken PNG.

The demo's figures, the SSL trainer's progress.png and the benchmark's ratio charts are overwritten
run after run; each is drawn to a temporary name beside the target and renamed over it only once
complete, so a reader sees the previous figure or the new one, never half of one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["save_figure"]


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """``fig.savefig(path, **savefig_kwargs)`` through a temporary file and a rename; closes ``fig``.

    The folder is created if needed; on failure the temporary file is removed and ``path`` is left as
    it was."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
