#!/usr/bin/env bash
# Holds the server to its OpenAPI document: runs schemathesis (pinned in requirements.txt)
# against /api/v1/openapi.json of a fresh muster-server, every operation, every check, the
# stateful phase included, and exits non-zero on any failure.
#
#   tests/api/schemathesis.sh [SERVER_BIN [AGENT_BIN]]
#
# Builds nothing: the binaries default to target/debug/ (`cargo test` builds them). The server
# runs on loopback with a temporary data directory and without --dev. One agent is enrolled
# (labels site=lab, role=pos) and stopped again before the run, so jobs have somewhere to be
# committed and run nowhere: generated commands are never executed.
#
# Environment: SCHEMATHESIS_VENV (default target/schemathesis-venv), SCHEMATHESIS_EXAMPLES
# (cases per operation and phase, default 100: about 3,000 cases in two minutes here),
# SCHEMATHESIS_SEED (default: random, and printed, so a failure can be run again),
# SCHEMATHESIS_REPORT_DIR (a JUnit report; default: none kept), KEEP_LOGS=1 to keep the
# server's log and data directory.
set -euo pipefail

# Paths given are relative to where the script was started; the defaults to the repository.
server_bin=$(realpath -m "${1:-$(dirname "$0")/../../target/debug/muster-server}")
agent_bin=$(realpath -m "${2:-$(dirname "$0")/../../target/debug/muster-agent}")
venv=$(realpath -m "${SCHEMATHESIS_VENV:-$(dirname "$0")/../../target/schemathesis-venv}")
report=${SCHEMATHESIS_REPORT_DIR:+$(realpath -m "$SCHEMATHESIS_REPORT_DIR")}
cd "$(dirname "$0")/../.."
examples=${SCHEMATHESIS_EXAMPLES:-100}
seed=${SCHEMATHESIS_SEED:-$(( (RANDOM << 15) | RANDOM ))}
here=tests/api

for bin in "$server_bin" "$agent_bin"; do
  [ -x "$bin" ] || { echo "schemathesis.sh: $bin is not an executable; build it first (cargo test builds it)" >&2; exit 2; }
done

# The virtual environment, rebuilt whenever requirements.txt changes.
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi

work=$(mktemp -d)
server_pid=
agent_pid=
st_pid=
tail_pid=
cleanup() {
  local status=$?
  for pid in "$st_pid" "$tail_pid" "$agent_pid" "$server_pid"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ] && [ -f "$work/server.log" ]; then
    echo "== last lines of the server's log ($work/server.log)" >&2
    tail -n 40 "$work/server.log" >&2
  fi
  if [ "${KEEP_LOGS:-}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

data="$work/data"
token=$("$server_bin" --data-dir "$data" bootstrap --name schemathesis 2>/dev/null | head -n 1)
case "$token" in mst_*) ;; *) echo "schemathesis.sh: bootstrap printed no token" >&2; exit 1 ;; esac

"$server_bin" --listen 127.0.0.1:0 --data-dir "$data" --log info >"$work/server.log" 2>&1 &
server_pid=$!
addr=
for _ in $(seq 100); do
  addr=$(sed -n 's/.*serving agents.*addr=\([0-9.:]*\).*/\1/p' "$work/server.log" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "schemathesis.sh: the server exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "schemathesis.sh: the server did not say where it listens" >&2; exit 1; }
base="https://$addr"
ca="$data/tls/ca.pem"
api() { curl -sS --fail-with-body --cacert "$ca" -H "Authorization: Bearer $token" "$@"; }

# One agent, enrolled and then stopped: offline from here on, so runs wait for it and expire.
enroll=$(api -H 'content-type: application/json' -d '{"ttl_secs":600,"uses":1,"labels":{"site":"lab"}}' "$base/api/v1/enroll-tokens" |
  sed -n 's/.*"token":"\(mse_[0-9a-f_]*\)".*/\1/p')
[ -n "$enroll" ] || { echo "schemathesis.sh: could not create an enrollment token" >&2; exit 1; }
"$agent_bin" --server "$base" --ca "$ca" --state-dir "$work/agent" --enroll-token "$enroll" \
  --hostname schemathesis-agent --label role=pos --heartbeat-interval 1s --log warn >"$work/agent.log" 2>&1 &
agent_pid=$!
# wait_agents QUERY PATTERN: until GET /agents?QUERY shows PATTERN, for 15 s at most.
wait_agents() {
  for _ in $(seq 150); do
    api "$base/api/v1/agents?$1" | grep -q "$2" && return 0
    sleep 0.1
  done
  echo "schemathesis.sh: no agent like $2 in /agents?$1" >&2
  return 1
}
# Online with a heartbeat's metrics (so heartbeats and metrics are there to be checked), then
# stopped and offline.
wait_agents status=online '"metrics":{"hostname"'
kill "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
agent_pid=
wait_agents status=offline '"hostname":"schemathesis-agent"'
credential=$(sed -n 's/.*"token": *"\(msa_[0-9a-f_]*\)".*/\1/p' "$work/agent/credential.json")
[ -n "$credential" ] || { echo "schemathesis.sh: the agent stored no credential" >&2; exit 1; }

echo "== schemathesis $("$venv/bin/schemathesis" --version | sed 's/.*version //') against $base (seed $seed, $examples examples)"
# One worker: with two, hypothesis (which parses lambdas' source for their names) now and then
# trips over CPython 3.11's ast.parse, which is not thread-safe ("AST constructor recursion depth
# mismatch"), and the machine has two cores anyway. All four phases, every check.
report=${report:-$work/report}
start=$(date +%s)
# In the background, with its output followed, so that a signal to this script is handled at
# once (bash waits for a foreground command before it runs a trap) and stops it too.
ST_ADMIN_TOKEN=$token ST_AGENT_CREDENTIAL=$credential ST_CACHE_DIR="$work/cache" \
"$venv/bin/schemathesis" --no-color --config-file "$here/schemathesis.toml" run "$base/api/v1/openapi.json" \
  --tls-verify "$ca" \
  --checks all \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$examples" \
  --seed "$seed" \
  --workers 1 \
  --generation-database none \
  --report junit --report-dir "$report" >"$work/schemathesis.out" 2>&1 </dev/null &
st_pid=$!
tail -n +1 -f --pid "$st_pid" "$work/schemathesis.out" &
tail_pid=$!
status=0
wait "$st_pid" || status=$?
st_pid=
wait "$tail_pid" || true
tail_pid=
echo "== schemathesis finished in $(( $(date +%s) - start ))s with status $status"

# A run is only worth its name if its token still works and jobs were created, so that the
# links from POST /jobs had ids to follow.
if ! api "$base/api/v1/whoami" >/dev/null; then
  echo "schemathesis.sh: the admin token no longer works, so most of the run was refused" >&2
  status=1
fi
jobs=$(api "$base/api/v1/jobs?limit=1000" | grep -o '"ttl_secs":' | wc -l)
echo "== $jobs jobs were created (and none run: their one agent is offline)"
if [ "$jobs" -eq 0 ]; then
  echo "schemathesis.sh: no job was created, so the job operations saw no job" >&2
  status=1
fi

# One closing line in the plain form CI reads: cases passed, and unique failures (or errors).
counts=$(grep -E '^ *[0-9]+ generated, ' "$work/schemathesis.out" | tail -n 1)
passed=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$counts")
failed=$(sed -n 's/.* \([0-9]*\) unique failures\{0,1\}.*/\1/p' <<<"$counts")
errored=$(sed -n 's/.* \([0-9]*\) errored.*/\1/p' <<<"$counts")
generated=$(sed -n 's/^ *\([0-9]*\) generated.*/\1/p' <<<"$counts")
found=$(sed -n 's/.* \([0-9]*\) found .*/\1/p' <<<"$counts")
passed=${passed:-$(( ${generated:-0} - ${found:-0} - ${errored:-0} ))}
failed=$(( ${failed:-0} + ${errored:-0} ))
[ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1
echo "schemathesis: ${passed:-0} passed, $failed failed"
exit "$status"
