# Shared by the benchmark scripts: build release binaries, then start a fresh muster-server on
# loopback with a temporary data directory. Sets $dir, $token, $server_pid; cleans up on exit.
# SERVER_LOG sets the server's log filter; KEEP_LOG=FILE keeps its log.

cargo build --release -q -p server -p tests
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  wait 2>/dev/null
  grep -E "WARN|ERROR" "$dir/server.log" | head -5 || true
  [ -n "${KEEP_LOG:-}" ] && cp "$dir/server.log" "$KEEP_LOG"
  rm -rf "$dir"
}
trap cleanup EXIT

token=$("$bin"/muster-server --data-dir "$dir" bootstrap --name bench)
MUSTER_LOG=${SERVER_LOG:-warn} "$bin"/muster-server --data-dir "$dir" --listen "127.0.0.1:$PORT" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 100); do [ -f "$dir/tls/ca.pem" ] && break; sleep 0.1; done
