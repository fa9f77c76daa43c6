#!/usr/bin/env bash
# The project's one test command, the same for a newcomer, a developer and CI (.ci/run calls it):
#   bash scripts/test.sh            the whole suite
#   bash scripts/test.sh --fast     the fast tier: generated data; no Ray, Flower, browser or nginx (docs/design.md#tests)
# Any other argument goes to pytest. pytest exits 5 when it collected no test: that is a failure here too.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the whole suite needs (the fast tier needs none): headless Chromium checks the
# report pages (tests/test_report_browser.py); nginx is `fedbt server`'s public front, and nftables
# guards its control port (docs/deployment.md). Installed when missing on a Debian or Ubuntu
# machine where we are root; anywhere else a missing one stops the run here, in one line, rather
# than failing tests later.
require_system_packages() {
  local missing=()
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null ||
    missing+=(chromium)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v nft >/dev/null || [ -x /usr/sbin/nft ] || missing+=(nftables)
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null && return
  fi
  echo "scripts/test.sh: error: the whole suite needs ${missing[*]}: as root, apt-get install ${missing[*]};" \
    "or run the fast tier: bash scripts/test.sh --fast" >&2
  exit 1
}

fast=false
for arg in "$@"; do
  [ "$arg" = --fast ] && fast=true
done
$fast || require_system_packages

VENV="${FEDBT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c "import fedbt, torch, torchvision, flwr" # fails loudly if the install did not work
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Many processes train at once here (two workers, a federation's sites, Ray's clients) on few
# cores. OpenMP's idle threads spin by default and, so oversubscribed, take the cores from the
# threads with work: passive waiting sleeps instead (docs/design.md#tests has the measurement).
export OMP_WAIT_POLICY=PASSIVE
# --fast is conftest.py's option; the slowest tests are listed so that the fast tier stays fast.
# Two workers, each running whole files (so a file's shared federation starts once): most e2e
# tests wait on the processes they started, and the other worker uses that time. `-n 0` after
# this script's name runs everything in one process.
exec "$VENV/bin/python" -m pytest -q --durations=15 -n 2 --dist loadfile "$@"
