#!/usr/bin/env bash
# Set up a virtual environment (once) and run the whole test suite.
# pytest exits 5 when it collected no test: that is a failure here too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDBT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c "import fedbt, torch, torchvision, flwr" # fails loudly if the install did not work
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec "$VENV/bin/python" -m pytest -q "$@"
