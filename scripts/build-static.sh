#!/usr/bin/env bash
# Builds ssed as one fully static binary and checks it stands on its own:
# no dynamic dependencies (ldd), at most 4.5 MiB (the budget with TLS in:
# issue 14), it starts, and it answers
# /healthz.
#
#     bash scripts/build-static.sh        # -> target/static/ssed
#     SSED_STATIC=gnu bash scripts/build-static.sh
#
# Two ways, the first that can be built here wins (SSED_STATIC=musl or gnu
# picks one):
#
# - musl (x86_64-unknown-linux-musl; rustup adds the target and apt the
#   musl-gcc that the bundled SQLite compiles with, when missing). The one
#   to deploy: musl's thread block and TLS are small enough that an idle
#   stream's thread touches a single stack page, against two with glibc,
#   and its allocator keeps no per-thread cache: 5.6 KiB of RSS per idle
#   stream against 10.9 (README, "Benchmarks").
# - glibc linked statically (-C target-feature=+crt-static). Its caveat:
#   resolving host names goes through NSS modules a static glibc cannot
#   load, so give `listen` and database URLs as IP addresses.
#
# The binary is copied to target/static/ssed; the script says which it is.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'static build: %s\n' "$*"; }

musl=x86_64-unknown-linux-musl
gnu=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/static}

# Makes the musl target and compiler available; false if they cannot be.
musl_ready() {
  if ! rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
    say "adding the rust target $musl"
    rustup target add "$musl" || return 1
  fi
  if ! command -v musl-gcc >/dev/null 2>&1; then
    bash scripts/apt-install.sh "static build" musl-tools || return 1
  fi
}

case "${SSED_STATIC:-}" in
  musl) musl_ready || { say "the musl target cannot be set up here"; exit 1; }; target=$musl ;;
  gnu) target=$gnu ;;
  "") if musl_ready; then target=$musl; else say "musl unavailable: building with static glibc"; target=$gnu; fi ;;
  *) say "SSED_STATIC must be musl or gnu, not '$SSED_STATIC'"; exit 2 ;;
esac

if [[ $target == "$musl" ]]; then
  cargo build --release --locked --target "$target"
else
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$target"
fi
bin="$CARGO_TARGET_DIR/$target/release/ssed"
say "target: $target"

deps=$(ldd "$bin" 2>&1 || true)
case "$deps" in
  *"not a dynamic executable"*|*"statically linked"*) say "ldd: $deps" ;;
  *) say "not static: ldd says:"; printf '%s\n' "$deps"; exit 1 ;;
esac
size=$(stat -c %s "$bin")
say "size: $size bytes ($((size / 1024)) KiB)"
if (( size > 9 * 512 * 1024 )); then say "larger than 4.5 MiB"; exit 1; fi

# Start it on a free port (from its log line), ask /healthz, stop it.
log=$(mktemp)
RUST_LOG=info "$bin" --listen 127.0.0.1:0 2>"$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 100); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\) .*/\1/p' "$log" | head -1)
  [[ -n "$addr" ]] && break
  sleep 0.05
done
[[ -n "$addr" ]] || { say "no 'listening on' line:"; cat "$log"; exit 1; }
host=${addr%:*}; port=${addr##*:}
exec 3<>"/dev/tcp/$host/$port"
printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$addr" >&3
reply=$(timeout 5 cat <&3)
exec 3<&-
case "$reply" in
  "HTTP/1.1 200 OK"*'"status":"ok"'*) say "GET /healthz: 200 $(printf '%s' "$reply" | tail -1)" ;;
  *) say "unexpected /healthz answer:"; printf '%s\n' "$reply"; exit 1 ;;
esac
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
say "idle RSS: ${rss} KiB"
kill -TERM "$pid"
wait "$pid" || { say "did not exit cleanly on SIGTERM"; exit 1; }
trap - EXIT
rm -f "$log"
cp "$bin" "$CARGO_TARGET_DIR/ssed"
say "ok: $CARGO_TARGET_DIR/ssed (built for $target)"
