#!/usr/bin/env bash
# README's main-job command: set up ./.venv, then run the demo on the built-in phantom dataset.
# Extra arguments go to logonet_demo, e.g. `bash scripts/demo.sh --quick`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
exec logonet_demo "$@"
