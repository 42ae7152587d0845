#!/usr/bin/env bash
# Create (or reuse) ./.venv and install nnunet-logonet with its test extra. Sourced by
# scripts/demo.sh and scripts/test.sh, so each README command does its own set-up.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOGONET_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.logonet-install-stamp"
want="$(cat "$repo/setup.cfg" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)"

# The first install needs room: nnunetv2's torchvision pulls in PyTorch's CUDA build, which with its libraries
# takes about 6.3 GiB; on a full disk pip stops half-way with "No space left on device". Checked before anything
# is written, and only while the environment has no PyTorch (an upgrade of an installed one needs little).
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c \
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
  existing="$venv"
  while [ ! -e "$existing" ]; do existing="$(dirname "$existing")"; done
  free_kib="$(df -Pk "$existing" 2>/dev/null | awk 'NR == 2 {print $4}')" || free_kib=""
  if [[ "$free_kib" =~ ^[0-9]+$ ]] && [ "$free_kib" -lt $((7 * 1024 * 1024)) ]; then
    free_gib="$(awk -v k="$free_kib" 'BEGIN {printf "%.1f", k / 1048576}')"
    echo "[setup] not enough disk space to install into $venv: its file system ($existing) has $free_gib GiB free," \
      "and nnU-Net with PyTorch (the CUDA build that nnunetv2's torchvision pulls in) takes about 6.3 GiB;" \
      "7 GiB are needed. Free some space there, or set LOGONET_VENV to a folder on a larger disk" \
      "(LOGONET_VENV=/big/disk/venv bash scripts/test.sh), and run the command again." >&2
    return 1 2>/dev/null || exit 1
  fi
fi

# one set-up at a time: the two README commands started together on a fresh clone both ran pip
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
  echo "[setup] another set-up of $venv is running; waiting for it to finish"
  flock 9
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
elif ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  # a set-up interrupted while `python -m venv` installed pip leaves a venv without it
  echo "[setup] $venv has no pip (an interrupted set-up?); repairing it"
  "$venv/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 || "$python" -m venv --clear "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$venv/bin/python" -c "import nnunet_logonet, nnunetv2" 2>/dev/null; then
  echo "[setup] installing nnunet-logonet and its dependencies (first time: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$repo[test]"
  echo "$want" > "$stamp"
else
  echo "[setup] reusing $venv"
fi
exec 9>&-
export PATH="$venv/bin:$PATH"
# Settings for nnU-Net on small CPU machines (nnU-Net's own variables).
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
export nnUNet_compile="${nnUNet_compile:-f}"
# worker processes of nnU-Net's validation export, prediction and evaluation (its default, 8, spawns 8
# fresh Pythons that each import torch: on 2 cores a 2-case validation took 70 s instead of 30 s)
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
