#!/usr/bin/env bash
# Builds ssed as one fully static binary and checks it stands on its own:
# no dynamic dependencies (ldd), it starts, and it answers /healthz.
#
#     bash scripts/build-static.sh            # -> target/static/x86_64-unknown-linux-gnu/release/ssed
#
# glibc linked statically (-C target-feature=+crt-static). One caveat of
# static glibc: resolving host names goes through NSS modules it cannot load,
# so give `listen` (and database URLs) as IP addresses, not names.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/static}
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$target"
bin="$CARGO_TARGET_DIR/$target/release/ssed"

say() { printf 'static build: %s\n' "$*"; }

deps=$(ldd "$bin" 2>&1 || true)
case "$deps" in
  *"not a dynamic executable"*|*"statically linked"*) say "ldd: $deps" ;;
  *) say "not static: ldd says:"; printf '%s\n' "$deps"; exit 1 ;;
esac
size=$(stat -c %s "$bin")
say "size: $size bytes ($((size / 1024)) KiB)"
if (( size > 4 * 1024 * 1024 )); then say "larger than 4 MiB"; exit 1; fi

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
say "ok: $bin"
