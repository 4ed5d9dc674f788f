#!/usr/bin/env bash
# A broadcast to many agents: simulated agents over real wss to a release muster-server on
# loopback; one job targets all of them, and the time until every run is dispatched and every
# result is stored is measured. See docs/benchmarks.md.
#
#   tests/bench/broadcast.sh                  # 10,000 agents, 3 rounds
#   AGENTS=1000 ROUNDS=5 tests/bench/broadcast.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS=${AGENTS:-10000}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18544}

cargo build --release -q -p server -p tests
dir=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

token=$(target/release/muster-server --data-dir "$dir" bootstrap --name bench)
MUSTER_LOG=${SERVER_LOG:-warn} target/release/muster-server --data-dir "$dir" --listen "127.0.0.1:$PORT" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 100); do [ -f "$dir/tls/ca.pem" ] && break; sleep 0.1; done

target/release/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" broadcast --db "$dir/muster.db" --rounds "$ROUNDS"
grep -E "WARN|ERROR" "$dir/server.log" | head -5 || true
[ -n "${KEEP_LOG:-}" ] && cp "$dir/server.log" "$KEEP_LOG"
