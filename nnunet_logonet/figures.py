"""Writing matplotlib figures so that an interrupted or failed save never leaves a broken PNG.

The demo's figures, the SSL trainer's progress.png and the benchmark's ratio charts are overwritten
run after run; each is drawn to a temporary name beside the target and renamed over it only once
complete, so a reader sees the previous figure or the new one, never half of one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["save_figure", "figure_path"]


def _formats() -> dict[str, str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return FigureCanvasBase.get_supported_filetypes()


def figure_path(value: str) -> Path:
    """An ``argparse`` type for figure files (``--chart``, ``-o``): checked when the command starts, not after
    a run of minutes. A name without a suffix is drawn as PNG; another suffix must be a format matplotlib
    writes; a folder is refused."""
    import argparse

    from nnunet_logonet.workfolders import output_file_argument

    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder; give a file name such as {path / 'chart.png'}")
    output_file_argument(value)
    suffix = path.suffix.lower().lstrip(".")
    if suffix and suffix not in _formats():
        raise argparse.ArgumentTypeError(f"{value!r}: matplotlib cannot write .{suffix} figures; use one of "
                                         f"{', '.join('.' + s for s in sorted(_formats()))} (e.g. .png)")
    return path


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """``fig.savefig(path, **savefig_kwargs)`` through a temporary file and a rename; closes ``fig``.

    The folder is created if needed; on failure the temporary file is removed and ``path`` is left as
    it was."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.suffix:  # matplotlib would read the format from the temporary name's ".tmpNNN"
        savefig_kwargs.setdefault("format", "png")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
