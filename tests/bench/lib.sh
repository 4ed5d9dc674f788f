# Shared by the benchmark scripts: build release binaries, then start a fresh muster-server on
# loopback with a temporary data directory. Sets $dir, $db (what `muster-loadgen --db` reads),
# $token, $server_pid; cleans up on exit. SERVER_LOG sets the server's log filter;
# KEEP_LOG=FILE keeps its log. BACKEND=postgres runs the server on a private PostgreSQL cluster
# (Debian's postgresql, initdb into a temporary directory, loopback only, default settings:
# fsync and synchronous_commit on) instead of SQLite.

cargo build --release -q -p server -p tests
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
server_pid=
pgdir=
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  wait 2>/dev/null
  grep -E "WARN|ERROR" "$dir/server.log" | head -5 || true
  [ -n "${KEEP_LOG:-}" ] && cp "$dir/server.log" "$KEEP_LOG"
  [ -n "$pgdir" ] && as_postgres "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1
  rm -rf "$dir" ${pgdir:+"$pgdir"}
}
trap cleanup EXIT

db="$dir/muster.db"
db_flags=()
if [ "${BACKEND:-sqlite}" = postgres ]; then
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pgdir=$(mktemp -d)
  [ "$(id -u)" = 0 ] && chown postgres "$pgdir"
  PGPORT=${PGPORT:-55433}
  as_postgres "$pgbin/initdb" -D "$pgdir/data" --auth=trust -U postgres -E UTF8 --locale=C >/dev/null
  as_postgres "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
    -o "-k $pgdir -c listen_addresses=127.0.0.1 -p $PGPORT -c max_connections=200" start >/dev/null
  as_postgres "$pgbin/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres muster
  db="postgres://postgres@127.0.0.1:$PGPORT/muster"
  db_flags=(--database "$db")
fi

token=$("$bin"/muster-server --data-dir "$dir" "${db_flags[@]}" bootstrap --name bench)
MUSTER_LOG=${SERVER_LOG:-warn} "$bin"/muster-server --data-dir "$dir" "${db_flags[@]}" --listen "127.0.0.1:$PORT" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 100); do [ -f "$dir/tls/ca.pem" ] && break; sleep 0.1; done
