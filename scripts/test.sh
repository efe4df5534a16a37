#!/usr/bin/env bash
# Run the test suite (CPU). Creates or reuses the virtualenv first. Extra arguments go to pytest.
# Two worker processes (pytest-xdist), one test file each at a time in the order tests/conftest.py gives (the
# costliest first), unless the arguments choose (-n, -p no:xdist); MOE_NNUNET_TEST_WORKERS sets their number.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
workers=(-n "${MOE_NNUNET_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
for arg in "$@"; do
  case "$arg" in -n|-n*|--numprocesses*|no:xdist) workers=() ;; esac
done
exec "$VENV/bin/python" -m pytest tests "${workers[@]}" "$@"
