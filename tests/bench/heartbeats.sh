#!/usr/bin/env bash
# Heartbeats per second ingested into SQLite, end to end: simulated agents over real wss to a
# release muster-server on loopback, counted in the database file. See docs/benchmarks.md.
#
#   tests/bench/heartbeats.sh                 # 2000 agents, 100 ms interval (20,000/s offered), 20 s
#   AGENTS=10000 INTERVAL=500ms tests/bench/heartbeats.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS=${AGENTS:-2000}
INTERVAL=${INTERVAL:-100ms}
DURATION=${DURATION:-20s}
PORT=${PORT:-18543}

cargo build --release -q -p server -p tests
dir=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

token=$(target/release/muster-server --data-dir "$dir" bootstrap --name bench)
MUSTER_LOG=warn target/release/muster-server --data-dir "$dir" --listen "127.0.0.1:$PORT" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 100); do [ -f "$dir/tls/ca.pem" ] && break; sleep 0.1; done

target/release/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" \
  heartbeats --interval "$INTERVAL" --duration "$DURATION" --db "$dir/muster.db"
grep -E "WARN|ERROR" "$dir/server.log" | head -5 || true
