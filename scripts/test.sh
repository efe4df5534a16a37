#!/usr/bin/env bash
# Run the test suite (CPU). Creates or reuses the virtualenv first. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
