#!/usr/bin/env bash
# README's test command: set up ./.venv, then run the test suite as CI does: every test not marked
# slow, the real end-to-end pass through nnU-Net's commands included (setup.cfg's addopts).
# Extra arguments go to pytest: `-m slow` runs the long end-to-end runs left out (the quick demo, the
# learning check, ...), `-m "slow or not slow"` everything, `-m "not e2e"` only the in-process tests.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treated as a failure" >&2
  exit 1
fi
exit "$rc"
