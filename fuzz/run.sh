#!/usr/bin/env bash
# Runs Muster's fuzz targets for SECONDS each (default 20) against their committed corpora, one
# at a time, and exits non-zero if any of them crashes, hangs or fails an assertion.
#
#   bash fuzz/run.sh [SECONDS] [--all | TARGET...]
#
# With no target it runs the four that build from `shared` alone (a clean build takes about two
# minutes on two cores). config_load needs the server and agent crates built with coverage
# instrumentation (about eleven minutes clean): name it, or pass --all. See fuzz/README.md.
#
# New inputs a run discovers go to a scratch directory, not into fuzz/corpus; a crashing input
# is kept in fuzz/artifacts/TARGET/ and its panic is printed.
set -euo pipefail
cd "$(dirname "$0")"

quick=(protocol_decode selector_parse duration_parse timestamp_parse)
secs=20
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  secs=$1
  shift
fi
targets=()
for arg in "$@"; do
  case $arg in
    --all) targets+=("${quick[@]}" config_load) ;;
    protocol_decode | selector_parse | duration_parse | timestamp_parse | config_load) targets+=("$arg") ;;
    *)
      echo "usage: $0 [SECONDS] [--all | TARGET...]" >&2
      exit 64
      ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${quick[@]}")
features=()
for t in "${targets[@]}"; do
  if [ "$t" = config_load ]; then features=(--features config); fi
done

echo "== fuzz: ${targets[*]}, ${secs}s each"

# Nightly if it is there; else the default toolchain, which works too: with `-s none`
# cargo-fuzz uses no unstable flag.
toolchain=(+nightly)
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "no nightly toolchain; using the default one"
  toolchain=()
fi
if ! cargo "${toolchain[@]}" fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo "${toolchain[@]}" --version

# Sanitizer none: the code is safe Rust, and ASan would double the build for little. cargo-fuzz
# keeps debug assertions and overflow checks on, so arithmetic overflow is a crash.
start=$SECONDS
cargo "${toolchain[@]}" fuzz build -s none "${features[@]}"
echo "build: $((SECONDS - start))s"

shm=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && shm=/dev/shm
scratch=$(mktemp -d "$shm/muster-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
# config_load writes each input to a file here (tmpfs: on a disk the write is most of the time).
export MUSTER_FUZZ_DIR=$scratch

failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log=$scratch/$t.log
  started=$SECONDS
  if cargo "${toolchain[@]}" fuzz run -s none "${features[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "$t: $status, ${runs:-?} executions in $((SECONDS - started))s, corpus $(find "corpus/$t" -type f | wc -l) files"
  if [ "$status" = FAILED ]; then
    # From the panic (or libFuzzer's own error: timeout, out of memory) to the input as
    # libFuzzer shows it and where it saved it; without one (a build error), the log's end.
    awk '/panicked at|ERROR: libFuzzer|ALARM:/ { p = 1 }
         p && !/^ +[0-9]+: |^ +at |^#[0-9]+/ { print }
         /^Base64:/ { exit }' "$log" | grep . || tail -n 30 "$log"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${failed[*]} failed; reproduce with: cd fuzz && cargo +nightly fuzz run -s none [--features config] TARGET artifacts/TARGET/<file>"
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${secs}s without a crash"
