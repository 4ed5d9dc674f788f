#!/usr/bin/env bash
# Heartbeats per second ingested into SQLite, end to end: simulated agents over real wss to a
# release muster-server on loopback, counted in the database file. See docs/benchmarks.md.
#
#   tests/bench/heartbeats.sh                 # 4000 agents, 200 ms interval (20,000/s offered), 20 s
#   AGENTS=10000 INTERVAL=500ms tests/bench/heartbeats.sh
#
# 200 ms is the shortest interval an agent may announce; the server stores at most one sample
# per half interval, so the offered rate comes from more agents, not faster ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS=${AGENTS:-4000}
INTERVAL=${INTERVAL:-200ms}
DURATION=${DURATION:-20s}
PORT=${PORT:-18543}
source tests/bench/lib.sh

"$bin"/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" \
  heartbeats --interval "$INTERVAL" --duration "$DURATION" --db "$db"
