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
source tests/bench/lib.sh

target/release/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" \
  heartbeats --interval "$INTERVAL" --duration "$DURATION" --db "$dir/muster.db"
