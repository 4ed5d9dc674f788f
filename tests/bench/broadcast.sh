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
source tests/bench/lib.sh

"$bin"/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" broadcast --db "$db" --rounds "$ROUNDS"
