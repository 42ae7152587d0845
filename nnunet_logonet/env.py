"""``logonet_env``: print the ``export`` lines that prepare a shell for nnU-Net with LoGoNet.

Usage: ``eval "$(logonet_env)"``. nnU-Net finds plugin trainers through its own
``nnUNet_extTrainer`` variable (nnU-Net >= 2.8); this points it at the installed
``trainers/`` folder. The three nnU-Net data folders are kept if already set, else put under
``--base``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainers_folder() -> Path:
    """The folder holding the thin trainer modules, wherever the package is installed (found, not
    imported: printing the variables needs neither PyTorch nor nnU-Net)."""
    from importlib.util import find_spec

    return Path(find_spec("nnunet_logonet.trainers").origin).resolve().parent


def environment(base: str | os.PathLike = "nnUNet_data", environ: dict | None = None) -> dict[str, str]:
    """The variables nnU-Net needs, with values already set in ``environ`` kept."""
    environ = os.environ if environ is None else environ
    base_path = Path(base).expanduser().resolve()
    variables: dict[str, str] = {}
    for name in NNUNET_FOLDERS:
        variables[name] = environ.get(name) or str(base_path / name)
    folder = str(trainers_folder())
    existing = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    variables["nnUNet_extTrainer"] = os.pathsep.join([folder] + [p for p in existing if p != folder])
    return variables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="logonet_env",
        description='Print export lines for nnU-Net + LoGoNet. Use: eval "$(logonet_env)"',
    )
    parser.add_argument("--base", default="nnUNet_data",
                        help="folder under which nnUNet_raw/_preprocessed/_results are put when "
                             "not already set (default: ./nnUNet_data)")
    parser.add_argument("--mkdir", action="store_true", help="also create the data folders")
    args = parser.parse_args(argv)
    if not args.base.strip():
        parser.error("--base is empty; give a folder, e.g. --base nnUNet_data")
    variables = environment(args.base)
    for name in NNUNET_FOLDERS:  # nnU-Net reads a relative folder from wherever each command runs
        if not Path(variables[name]).is_absolute():
            absolute = str(Path(variables[name]).expanduser().absolute())
            print(f"logonet_env: {name}={variables[name]} is relative, so each command would look for it in the "
                  f"folder it runs in; exported as {absolute}", file=sys.stderr)
            variables[name] = absolute
    for name in NNUNET_FOLDERS:  # set ones are the user's; the base's are checked before any export is printed
        problem = _folder_problem(Path(variables[name]))
        if problem:
            source = f"{name} (already set)" if os.environ.get(name) else f"--base {args.base}"
            parser.error(f"{source}: {problem}")
    lines = []
    for name, value in variables.items():
        if args.mkdir and name in NNUNET_FOLDERS:
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                parser.error(f"cannot create {value} ({error.strerror or error}); choose another --base")
        lines.append(f"export {name}={shlex.quote(value)}")
    print("\n".join(lines))


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` can never be a data folder (it or a folder above it is a file), or None."""
    from nnunet_logonet.workfolders import file_in_the_way

    folder = folder.absolute()
    blocking = file_in_the_way(folder)
    if blocking is None:
        return None
    return f"{blocking} is a file, not a folder" if blocking == folder else \
        f"{blocking} is a file, so {folder} cannot be a folder"


if __name__ == "__main__":
    main()
