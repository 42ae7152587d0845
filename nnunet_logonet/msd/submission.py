"""``logonet_msd_submission``: pack validated MSD test-set predictions into one archive.

Layout inside the archive: one folder per task named as the task folder, holding one label map
per test case under the case's original MSD file name::

    Task09_Spleen/spleen_1.nii.gz
    Task09_Spleen/spleen_7.nii.gz
    ...

Every case of every task is validated (:mod:`nnunet_logonet.msd.validation`) before anything is
written; an incomplete submission is refused unless ``allow_incomplete``. The archive is built
under a temporary name next to the target and moved into place with ``os.replace``, so a failure
never leaves a half-written archive, and an existing archive is kept unless ``overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

import SimpleITK as sitk
from tqdm import tqdm

from nnunet_logonet.msd.validation import (DAMAGE_FIX, TaskReport, file_damage, output_pixel_type,
                                           validate_task)
from nnunet_logonet.workfolders import exit_cleanly_on_sigterm, new_work_file, remove_stale_work_files

__all__ = ["IncompleteSubmissionError", "archive_format", "main", "write_submission"]

ARCHIVE_FORMATS = {".zip": "zip", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar": "w:"}
Pair = Union[tuple[Union[str, os.PathLike], Union[str, os.PathLike]], TaskReport]


class IncompleteSubmissionError(ValueError):
    """Some expected cases are missing or invalid and ``allow_incomplete`` was not given."""

    def __init__(self, reports: Sequence[TaskReport], message: str):
        super().__init__(message)
        self.reports = list(reports)


def archive_format(path: str | os.PathLike) -> str:
    """The archive kind for ``path`` from its suffix; ``ValueError`` naming the accepted ones."""
    name = Path(path).name.lower()
    for suffix, kind in ARCHIVE_FORMATS.items():
        if name.endswith(suffix):
            if name == suffix:
                raise ValueError(f"Archive name {Path(path).name!r} has no name before {suffix} (it would be a "
                                 f"hidden file); give one such as submission{suffix}.")
            return kind
    raise ValueError(f"Archive name {Path(path).name!r} must end with one of "
                     f"{', '.join(ARCHIVE_FORMATS)} (the MSD accepts .zip or .tar.gz).")


def check_archive_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail fast, before any validation, on a target that cannot be written."""
    archive = Path(path).expanduser().resolve()
    archive_format(archive)
    if archive.is_dir():
        raise ValueError(f"Archive path {archive} is a folder; give a file name ending .zip or "
                         f".tar.gz.")
    if archive.exists() and not overwrite:
        raise FileExistsError(f"Archive {archive} already exists; pass --overwrite "
                              f"(overwrite=True from Python) to replace it, or choose another name.")
    if not archive.parent.is_dir():
        raise ValueError(f"Folder {archive.parent} for the archive does not exist; create it first.")
    if not os.access(archive.parent, os.W_OK | os.X_OK):
        raise ValueError(f"Folder {archive.parent} for the archive cannot be written to; choose another folder.")
    return archive


@contextmanager
def _archive_writer(path: Path, kind: str) -> Iterator[Callable[[Path | None, str], None]]:
    """Yield ``add(file_or_None, name)``; ``None`` adds a folder entry."""
    if kind == "zip":
        # .nii.gz is already compressed: store, do not deflate again.
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            def add(file: Path | None, name: str) -> None:
                if file is None:
                    archive.writestr(zipfile.ZipInfo(name.rstrip("/") + "/",
                                                     time.localtime()[:6]), b"")
                else:
                    archive.write(file, name)
            yield add
    else:
        # dereference: a prediction folder gathered with `ln -s` must give the files, not links to this machine
        with tarfile.open(path, kind, dereference=True) as archive:
            def add(file: Path | None, name: str) -> None:
                if file is None:
                    info = tarfile.TarInfo(name.rstrip("/"))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                    archive.addfile(info)
                else:
                    archive.add(file, name, recursive=False)
            yield add


def _file_for_archive(source: Path, pixel_type: int, scratch: Path) -> Path:
    """The prediction as it goes into the archive: the file itself when it is already a
    ``.nii.gz`` of the output type (bytes untouched), else a cast copy written to ``scratch``.

    The file is checked whole again (:func:`file_damage`): it may have changed since it was
    validated, and ITK would read a truncated one as zeros. ``OSError`` when it is damaged."""
    damage = file_damage(source)
    if damage:
        raise OSError(f"{damage}; {DAMAGE_FIX}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    reader.ReadImageInformation()
    if source.name.endswith(".nii.gz") and reader.GetPixelID() == pixel_type:
        return source
    image = sitk.Cast(sitk.ReadImage(str(source)), pixel_type)
    target = scratch / "cast.nii.gz"
    sitk.WriteImage(image, str(target), useCompression=True)
    return target


def write_submission(pairs: Sequence[Pair], archive_path: str | os.PathLike, *,
                     allow_incomplete: bool = False, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Validate and pack predictions for one or more MSD tasks into one archive.

    Args:
        pairs: ``(task_folder, prediction_folder)`` pairs, or :class:`TaskReport` objects from
            :func:`validate_task` (not validated again).
        archive_path: target ``.zip`` or ``.tar.gz`` (``.tgz``, ``.tar`` also accepted).
        allow_incomplete: write the valid cases when some are missing or invalid, instead of
            refusing. Reports (``validate_task``) say which cases were left out.
        overwrite: replace an existing archive.
        progress: tqdm bars over cases (only on a terminal).

    Returns:
        The archive path.

    Raises:
        IncompleteSubmissionError: a case is missing or invalid and not ``allow_incomplete``, or
            no task has a single valid case; nothing is written.
        FileExistsError: the archive exists and not ``overwrite``.
        ValueError: bad archive name, a task given twice, or a folder that is not an MSD task.
    """
    archive = check_archive_target(archive_path, overwrite)
    kind = archive_format(archive)
    reports = [pair if isinstance(pair, TaskReport) else validate_task(*pair, progress=progress)
               for pair in pairs]
    if not reports:
        raise ValueError("No task given; pass at least one (task_folder, prediction_folder) pair.")
    names = [report.task_name for report in reports]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Task(s) {repeated} given more than once; each task gets one folder "
                         f"in the archive.")
    incomplete = [report for report in reports if not report.complete]
    if incomplete and not allow_incomplete:
        raise IncompleteSubmissionError(incomplete, "Incomplete submission for "
                                        f"{', '.join(r.task_name for r in incomplete)}; nothing "
                                        f"written (--allow-incomplete, or allow_incomplete=True from "
                                        f"Python, writes the valid cases only).")
    if not any(report.found for report in reports):
        raise IncompleteSubmissionError(reports, "No valid prediction in any task; nothing written.")

    remove_stale_work_files(archive.parent, archive.name, "part")  # left by a killed run
    temp = None
    try:
        temp = new_work_file(archive.parent, archive.name, "part")
        with tempfile.TemporaryDirectory() as scratch, _archive_writer(temp, kind) as add:
            for report in reports:
                add(None, report.task_name)
                pixel_type = output_pixel_type(report.labels)
                for result in tqdm(report.found, desc=f"packing {report.task_name}", unit="case",
                                   disable=None if progress else True):
                    try:
                        source = _file_for_archive(result.file, pixel_type, Path(scratch))
                        add(source, f"{report.task_name}/{result.case}")
                    except (RuntimeError, OSError) as error:
                        raise ValueError(f"Cannot pack {result.file} (changed or removed since "
                                         f"validation?): {error}; nothing written.") from error
        os.replace(temp, archive)
    except BaseException:
        if temp is not None:
            temp.unlink(missing_ok=True)
        raise
    return archive


def _left_out(reports: Sequence[TaskReport]) -> list[str]:
    lines = []
    for report in reports:
        lines += [f"  {report.task_name}/{name}: missing" for name in report.missing]
        lines += [f"  {report.task_name}/{r.case}: invalid ({'; '.join(r.reasons)})"
                  for r in report.invalid]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="logonet_msd_submission",
        description="Validate MSD test-set predictions and pack them into one submission archive "
                    "(one folder per task, one file per imagesTs case under its MSD name). "
                    "Nothing is written unless every case is valid or --allow-incomplete is given.")
    parser.add_argument("--task", nargs=2, action="append", required=True,
                        metavar=("TASK_FOLDER", "PRED_FOLDER"),
                        help="an MSD task folder (TaskXX_Name/ with dataset.json and imagesTs) and "
                             "the folder of predictions for its imagesTs; repeat for more tasks")
    parser.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                        help="archive to write, ending .zip or .tar.gz (the MSD's; .tgz and .tar are written too)")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="write the valid cases even if some are missing or invalid")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing archive")
    args = parser.parse_args(argv)
    if argv is None:  # the console script: `kill` and `timeout` exit through the cleanup too
        exit_cleanly_on_sigterm()
    try:
        return _validate_and_write(args)
    except KeyboardInterrupt:
        print("\nlogonet_msd_submission: interrupted; no archive was written (an existing one is unchanged).",
              file=sys.stderr)
        return 130


def _validate_and_write(args: argparse.Namespace) -> int:
    try:
        check_archive_target(args.output, args.overwrite)
        reports = [validate_task(task, predictions) for task, predictions in args.task]
    except (ValueError, FileExistsError) as error:
        print(f"logonet_msd_submission: error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.format())
    try:
        archive = write_submission(reports, args.output, allow_incomplete=args.allow_incomplete,
                                   overwrite=args.overwrite)
    except IncompleteSubmissionError as error:
        # The per-file reasons are in the reports printed above.
        print(f"REFUSED: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError) as error:
        print(f"logonet_msd_submission: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk, not the predictions: nothing half-written is left (write_whole)
        print(f"logonet_msd_submission: error: cannot write {args.output}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    written = sum(len(report.found) for report in reports)
    expected = sum(len(report.expected) for report in reports)
    print(f"Wrote {archive}: {written} of {expected} cases in {len(reports)} task folder(s).")
    left_out = _left_out(reports)
    if left_out:
        print(f"INCOMPLETE (--allow-incomplete): {expected - written} case(s) NOT in the archive:\n"
              + "\n".join(left_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
