#!/usr/bin/env bash
# One server and three sites as separate hosts: each in its own network namespace with its
# own address on a private bridge (ip netns + veth), talking TLS with site authentication.
# `fedbt run` is the operator, on the server host (runs are submitted on its loopback only).
# Needs root, iproute2 and nginx (the server's public front).
#
#   sudo bash scripts/netns_deploy.sh [WORK_DIR]      # exits 0 when the 2-round run completed
#
# Everything it creates (namespaces, bridge, processes) is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV="${FEDBT_VENV:-.venv}"
FEDBT="$ROOT/$VENV/bin/fedbt"
PYTHON="$ROOT/$VENV/bin/python"
WORK="$(realpath -m "${1:-$(mktemp -d /tmp/fedbt-netns.XXXXXX)}")"
PREFIX="fbt$$"                 # unique per run: parallel runs never share names
BRIDGE="${PREFIX}br"
SUBNET=10.77.$(($$ % 200 + 20))
OPERATOR_IP="$SUBNET.1"        # the root namespace
SERVER_IP="$SUBNET.2"
PORT=9092                      # the sites' (Fleet API only)
CONTROL_PORT=9093              # runs and site registration, on the server's loopback
SITES=(figshare sartaj br35h)
STEP_TIMEOUT=120
RUN_TIMEOUT=400
PIDS=()
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 OMP_NUM_THREADS=1

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for host in server "${SITES[@]}"; do ip netns del "$PREFIX-$host" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
}
trap cleanup EXIT

# A namespace with loopback up and one veth into the bridge, at the given address.
add_host() {
  local host=$1 address=$2 ns="$PREFIX-$1"
  ip netns add "$ns"
  ip link add "${PREFIX}${host:0:3}h" type veth peer name "${PREFIX}${host:0:3}n"
  ip link set "${PREFIX}${host:0:3}h" master "$BRIDGE" up
  ip link set "${PREFIX}${host:0:3}n" netns "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$address/24" dev "${PREFIX}${host:0:3}n"
  ip -n "$ns" link set "${PREFIX}${host:0:3}n" up
}

# Start a command in a namespace, in its own process group, output in a log file.
start_in() {
  local ns=$1 log=$2; shift 2
  setsid ip netns exec "$ns" "$@" >"$log" 2>&1 &
  PIDS+=($!)
}

wait_for_line() {
  local log=$1 text=$2 deadline=$((SECONDS + STEP_TIMEOUT))
  until grep -q "$text" "$log"; do
    if ((SECONDS > deadline)); then echo "timed out waiting for '$text' in $log" >&2; tail -20 "$log" >&2; exit 1; fi
    sleep 0.5
  done
}

mkdir -p "$WORK"
ip link add "$BRIDGE" type bridge
ip addr add "$OPERATOR_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
add_host server "$SERVER_IP"
for i in "${!SITES[@]}"; do add_host "${SITES[$i]}" "$SUBNET.$((11 + i))"; done

"$FEDBT" certs --out "$WORK/certs" --host "$SERVER_IP" --sites "${SITES[@]}"
"$FEDBT" data demo "$WORK/data" --per-class 12 >/dev/null

start_in "$PREFIX-server" "$WORK/server.log" "$FEDBT" server --certs "$WORK/certs" --host 0.0.0.0 --port $PORT \
  --state-dir "$WORK/server" --allow-root  # the hosts here are namespaces of one machine: no service account
wait_for_line "$WORK/server.log" "server ready"
for site in "${SITES[@]}"; do
  start_in "$PREFIX-$site" "$WORK/site-$site.log" "$FEDBT" site --site "sites/$site.yaml" \
    --server "$SERVER_IP:$PORT" --certs "$WORK/certs" --data-root "$WORK/data" \
    --cache-dir "$WORK/cache-$site" --state-dir "$WORK/site-$site" --connect-timeout 60
done
for site in "${SITES[@]}"; do wait_for_line "$WORK/site-$site.log" "connected to the server"; done

timeout "$RUN_TIMEOUT" ip netns exec "$PREFIX-server" "$FEDBT" run --server "127.0.0.1:$CONTROL_PORT" \
  --ca "$WORK/certs/ca.pem" --rounds 2 --set data.image_size=32 --set model.name=cnn --set train.threads=1 \
  --out "$WORK/results"

# Each site reached the server's front from its own address, and all three trained both rounds.
for i in "${!SITES[@]}"; do
  grep -q "\[front\] $SUBNET.$((11 + i)):[0-9]* .*\"POST /v1/fleet/activate-node" "$WORK/server.log" \
    || { echo "site ${SITES[$i]} did not connect from $SUBNET.$((11 + i))" >&2; exit 1; }
done
"$PYTHON" - "$WORK/results/federated/metrics.json" <<'EOF'
import json, sys
history = json.load(open(sys.argv[1]))["history"]
assert [h["round"] for h in history] == [1, 2], history
assert all(set(h["train"]) == {"figshare", "sartaj", "br35h"} for h in history), history
print(f"netns deployment: 2 rounds, 3 sites, each from its own namespace; results in {sys.argv[1]}")
EOF
