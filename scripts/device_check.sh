#!/usr/bin/env bash
# One run of everything worth timing on a lent GPU (docs/performance.md#the-device-check):
#   bash scripts/device_check.sh --out DIR [--quick] [--pack packs/brain-mri-128px.npz] [--commit SHA]
# writes DIR/device-check.json and DIR/device-check.md and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0
# Flower keeps its state in FLWR_HOME: a private one for this run unless one is given.
if [[ -z "${FLWR_HOME:-}" ]]; then
    FLWR_HOME="$(mktemp -d)"
    export FLWR_HOME
    trap 'rm -rf "$FLWR_HOME"' EXIT
fi
"$PYTHON" -m fedbt.cli bench --device-check "$@"
