#!/usr/bin/env bash
# A reconnect storm: simulated agents, connected over real wss to a release muster-server on
# loopback, lose it to SIGKILL; the server is restarted at once on the same data directory and
# port, and the agents come back with the agent's own backoff (no cap on attempts in flight).
# Prints how long until every agent is back and the connection-rate curve. See
# docs/benchmarks.md.
#
#   tests/bench/storm.sh                  # 10,000 agents
#   AGENTS=19000 SOURCE_ADDRS=4 tests/bench/storm.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS=${AGENTS:-10000}
PORT=${PORT:-18545}
source tests/bench/lib.sh

ready="$dir/ready"
"$bin"/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" --source-addrs "${SOURCE_ADDRS:-4}" \
  storm --ready-file "$ready" &
loadgen=$!
for _ in $(seq 1200); do [ -f "$ready" ] && break; kill -0 "$loadgen" 2>/dev/null || break; sleep 0.1; done
[ -f "$ready" ] || { echo "the simulated agents never all connected" >&2; exit 1; }
kill -9 "$server_pid"
wait "$server_pid" 2>/dev/null || true
MUSTER_LOG=${SERVER_LOG:-warn} "$bin"/muster-server --data-dir "$dir" "${db_flags[@]}" --listen "127.0.0.1:$PORT" 2>>"$dir/server.log" &
server_pid=$!
wait "$loadgen"
