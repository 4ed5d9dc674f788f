#!/usr/bin/env bash
# Builds Muster's packages into target/package/ (under $CARGO_TARGET_DIR if set): a .deb for muster-agent, a .deb for
# muster-server with the muster CLI, and a tarball of all three binaries with the unit files
# for other distributions. Needs cargo-deb (`cargo install cargo-deb --locked`).
#
#   packaging/build.sh                 # release builds (the agent with the small release-agent profile)
#   PROFILE=dev packaging/build.sh     # quick, for tests of the packaging itself
#   NO_BUILD=1 ...                     # package the binaries already built (the tests do: a
#                                      # build here would replace binaries other tests are running)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
AGENT_PROFILE=${AGENT_PROFILE:-$([ "$PROFILE" = release ] && echo release-agent || echo "$PROFILE")}
target=${CARGO_TARGET_DIR:-target}
out=$target/package
mkdir -p "$out"
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }

if [ -z "${NO_BUILD:-}" ]; then
  # The packaged server has no local development agent inside (`--dev` then says how to start one).
  cargo build -q --profile "$PROFILE" -p server --no-default-features
  cargo build -q --profile "$PROFILE" -p cli
  cargo build -q --profile "$AGENT_PROFILE" -p agent
fi
dir_of() { [ "$1" = dev ] && echo "$target/debug" || echo "$target/$1"; }
fast=$([ "$PROFILE" = dev ] && echo --fast || true)
cargo deb -q --no-build $fast --profile "$AGENT_PROFILE" -p agent -o "$out/"
cargo deb -q --no-build $fast --profile "$PROFILE" -p server -o "$out/"

version=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"name":"server","version":"\([^"]*\)".*/\1/p' | head -1)
arch=$(uname -m)
name="muster-${version:-0}-linux-$arch"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name/bin" "$stage/$name/systemd" "$stage/$name/etc/muster" "$stage/$name/sysusers.d"
install -m 755 "$(dir_of "$AGENT_PROFILE")/muster-agent" "$stage/$name/bin/"
install -m 755 "$(dir_of "$PROFILE")/muster-server" "$(dir_of "$PROFILE")/muster" "$stage/$name/bin/"
install -m 644 packaging/muster-agent.service packaging/muster-server.service "$stage/$name/systemd/"
install -m 644 packaging/server.toml "$stage/$name/etc/muster/"
install -m 644 packaging/muster.sysusers "$stage/$name/sysusers.d/muster.conf"
install -m 644 README.md "$stage/$name/"
tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
ls -1 "$out"
