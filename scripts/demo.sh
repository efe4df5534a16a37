#!/usr/bin/env bash
# Run the end-to-end demo on real packaged data. Creates or reuses the virtualenv first.
# Extra arguments go to `moe_nnunet demo` (see `moe_nnunet demo --help`).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec "$VENV/bin/moe_nnunet" demo "$@"
