#!/usr/bin/env bash
# The dashboard's fleet page with a large fleet: simulated agents over real wss to a release
# muster-server on loopback, and Debian's headless Chromium signing in, drawing the table and
# then following the live event stream. See docs/benchmarks.md.
#
#   tests/bench/dashboard.sh                  # 10,000 agents heartbeating every 10 s, 30 s live
#   AGENTS=2000 WATCH=60 tests/bench/dashboard.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS=${AGENTS:-10000}
INTERVAL=${INTERVAL:-10s}
WATCH=${WATCH:-30}
PORT=${PORT:-18545}
(cd tests/browser && [ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund --loglevel=error)
source tests/bench/lib.sh

# The simulated fleet stays up for the whole measurement, then stops by itself.
"$bin"/muster-loadgen --server "https://127.0.0.1:$PORT" --ca "$dir/tls/ca.pem" --token "$token" \
  --agents-file "$dir/agents.json" --agents "$AGENTS" \
  heartbeats --interval "$INTERVAL" --duration "$((WATCH + 150))s" --db "$db" >"$dir/loadgen.log" 2>&1 &
loadgen_pid=$!

online=0
for _ in $(seq 240); do
  online=$(curl -s --cacert "$dir/tls/ca.pem" -H "Authorization: Bearer $token" "https://127.0.0.1:$PORT/api/v1/fleet" \
    | sed -n 's/.*"online":\([0-9]*\).*/\1/p')
  [ "${online:-0}" -ge "$AGENTS" ] && break
  sleep 0.5
done
echo "online before the browser starts: $online"

NODE_EXTRA_CA_CERTS="$dir/tls/ca.pem" MUSTER_URL="https://127.0.0.1:$PORT" MUSTER_TOKEN="$token" AGENTS="$AGENTS" WATCH="$WATCH" node tests/browser/bench.mjs
kill "$loadgen_pid" 2>/dev/null || true
