"""Whether a NIfTI file's bytes are whole.

ITK (SimpleITK, nnU-Net's reader) reads a truncated ``.nii`` or ``.nii.gz`` without an error and
fills the missing voxels with zeros, so a copy cut short becomes a silently wrong image. The MSD
submission check and ``logonet_prepare_unlabeled`` both refuse such files through :func:`file_damage`.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

__all__ = ["file_damage", "is_gzip", "nifti_data_end", "nifti_shape"]

GZIP_MAGIC = b"\x1f\x8b"
STREAM_BLOCK = 1 << 20


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether the file starts with gzip's magic bytes (whatever its name says)."""
    with open(path, "rb") as stream:
        return stream.read(2) == GZIP_MAGIC


def nifti_data_end(path: str | os.PathLike) -> int | None:
    """Bytes a NIfTI file needs (header offset + voxel data), from its header; None if unknown."""
    import nibabel  # a dependency of nnunetv2; reads the header only

    try:  # the proxy's offset, not the header's vox_offset (ITK writes 0 there for 352)
        proxy = nibabel.load(str(path)).dataobj
        voxels = int(np.prod(proxy.shape, dtype=np.int64))
        return int(proxy.offset) + voxels * np.dtype(proxy.dtype).itemsize
    except Exception:  # a header nibabel rejects: ITK's reading stays the judge
        return None


def nifti_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The data shape a ``.nii``/``.nii.gz`` header declares (trailing dimensions of size 1 included, which
    ITK drops); None for other files or a header nibabel rejects."""
    if not str(path).endswith((".nii", ".nii.gz")):
        return None
    import nibabel

    try:
        return tuple(int(s) for s in nibabel.load(str(path)).header.get_data_shape())
    except Exception:  # ITK's reading stays the judge
        return None


def file_damage(path: str | os.PathLike) -> str | None:
    """Why a ``.nii``/``.nii.gz`` file's bytes are incomplete or damaged; None when whole.

    ITK reads a truncated NIfTI file without an error, the missing voxels set to 0, so this
    reads the gzip stream to its end in 1 MiB blocks (gzip checks its CRC and length; memory
    stays flat for files of hundreds of MB) and compares the data size with the header's.
    Other formats, and a ``.gz`` name on data that is not gzip, are left to the caller.
    """
    name = str(path)
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        if name.endswith(".gz"):
            if not is_gzip(path):
                return None
            size = 0
            with gzip.open(path, "rb") as stream:
                while block := stream.read(STREAM_BLOCK):
                    size += len(block)
        else:
            size = os.path.getsize(path)
    except EOFError:
        return "truncated: the gzip stream ends before its end marker"
    except (gzip.BadGzipFile, zlib.error) as error:
        return f"damaged: the gzip stream is corrupt ({error})"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    needed = nifti_data_end(path)
    if needed is not None and size < needed:
        what = "decompressed data" if name.endswith(".gz") else "file"
        return f"truncated: the {what} holds {size} bytes, its NIfTI header needs {needed}"
    return None
