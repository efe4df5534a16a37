# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse a virtualenv and install moe_nnunet into it.
# MOE_NNUNET_VENV chooses the virtualenv folder (default: .venv in the repository); PYTHON the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOE_NNUNET_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[moe_nnunet] creating virtualenv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
STAMP="$VENV/.moe_nnunet_setup_hash"
HASH="$(cat "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ] || ! "$VENV/bin/python" -c "import moe_nnunet.trainers" 2>/dev/null; then
  echo "[moe_nnunet] installing moe_nnunet and its dependencies (nnU-Net, torch) into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import moe_nnunet.trainers" || { echo "[moe_nnunet] installation failed" >&2; exit 1; }
  echo "$HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
