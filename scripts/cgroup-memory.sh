#!/usr/bin/env bash
# What a stream costs inside a memory cgroup, as the cgroup itself counts it
# (that is what its limit and the OOM killer go by): starts `ssed` in a
# fresh memory cgroup of its own, holds N idle subscribers from outside it
# with `ssed loadtest`, and reads the cgroup's usage before and after.
#
#     bash scripts/cgroup-memory.sh [--server BIN] [--streams N] [--stalled N]
#
#     --server BIN   the ssed to measure (default target/release/ssed; the
#                    static build is target/static/ssed)
#     --streams N    idle subscribers to hold (default 5000)
#     --stalled N    then also hold N subscribers that never read, publish
#                    until their send buffers are full, and report what each
#                    pins (default 0: skip)
#
# Needs root and a memory controller: cgroup v1 (/sys/fs/cgroup/memory) or
# v2 (a cgroup2 mount whose root lists `memory` in cgroup.subtree_control).
# The cgroup gets no limit (nothing is reclaimed under the measurement) and
# is removed at the end; the server and the load tester are stopped by PID.
#
# What each version counts: v1 `memory.usage_in_bytes` holds user pages and
# kernel memory (stacks, slab: the kernel's per-stream state), but not TCP
# buffers, which v1 counts apart (`memory.kmem.tcp.*`) and only once
# `memory.kmem.tcp.limit_in_bytes` is written (this script writes it with
# --stalled, to show the figure v2 would charge). v2 `memory.current`
# counts socket buffers too (`sock` in memory.stat).
# Working set = usage - inactive file pages (page cache the kernel can drop).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bin=target/release/ssed
streams=5000
stalled=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) bin=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --stalled) stalled=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "cgroup-memory: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "cgroup-memory: no executable at $bin (cargo build --release)" >&2; exit 2; }
[[ $streams =~ ^[0-9]+$ && $streams -gt 0 ]] || { echo "cgroup-memory: --streams wants a positive number" >&2; exit 2; }

if [[ -f /sys/fs/cgroup/memory/memory.usage_in_bytes ]]; then
  version=1
  cg=/sys/fs/cgroup/memory/ssed-measure-$$
  usage_file=memory.usage_in_bytes
  inactive_key=total_inactive_file
elif grep -qw memory /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
  version=2
  cg=/sys/fs/cgroup/ssed-measure-$$
  usage_file=memory.current
  inactive_key=inactive_file
else
  echo "cgroup-memory: no memory controller to make a cgroup in" >&2
  exit 2
fi

work=$(mktemp -d)
server=""; tester=""; stall=""
cleanup() {
  [[ -n $stall ]] && kill "$stall" 2>/dev/null || true
  [[ -n $tester ]] && kill "$tester" 2>/dev/null || true
  if [[ -n $server ]]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  # The cgroup can be removed once its last task is gone.
  for _ in $(seq 50); do rmdir "$cg" 2>/dev/null && break; sleep 0.1; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$cg"
if (( version == 1 && stalled > 0 )); then
  # Turns v1's TCP accounting on for this cgroup (any value does); the
  # limit itself is far above what the test uses.
  echo $((1 << 40)) >"$cg/memory.kmem.tcp.limit_in_bytes"
fi

cat >"$work/ssed.toml" <<'TOML'
heartbeat = "0"
max_execution_time = "0"
write_timeout = "10m"
max_connections = 100000
TOML
SSED_CG="$cg" RUST_LOG=info sh -c 'echo $$ > "$SSED_CG/cgroup.procs" && exec "$0" "$@"' \
  "$bin" --config "$work/ssed.toml" --listen 127.0.0.1:0 2>"$work/server.log" &
server=$!
addr=$(listening_addr cgroup-memory "$work/server.log")

stat() { awk -v k="$1" '$1 == k { print $2 }' "$cg/memory.stat"; }
usage() { cat "$cg/$usage_file"; }
working_set() { echo $(($(usage) - $(stat "$inactive_key"))); }
kmem() { if (( version == 1 )); then cat "$cg/memory.kmem.usage_in_bytes"; else echo $(($(stat kernel) + 0)); fi; }
tcp() { if (( version == 1 )); then cat "$cg/memory.kmem.tcp.usage_in_bytes"; else stat sock; fi; }
streams_open() {
  local host=${addr%:*} port=${addr##*:} reply
  exec 3<>"/dev/tcp/$host/$port" || { echo 0; return; }
  printf 'GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n' >&3
  reply=$(cat <&3)
  exec 3<&-
  sed -n 's/.*"streams_open":\([0-9]*\).*/\1/p' <<<"$reply" | head -1
}
kib() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%7.2f", (b - a) / n / 1024 }'; }
sleep 1
u0=$(usage); w0=$(working_set); k0=$(kmem); t0=$(tcp)
echo "cgroup v$version at $cg; server $bin (pid $server) on $addr"
echo "before                 usage $((u0 / 1024)) KiB, working set $((w0 / 1024)) KiB, kernel $((k0 / 1024)) KiB"

ramp=5000
hold=$((streams / ramp + 15))
(( stalled > 0 )) && hold=$((hold + 60))
"$bin" loadtest --url "http://$addr/events/idle" --connections "$streams" --ramp "$ramp/s" \
  --duration "${hold}s" --json >"$work/loadtest.json" 2>"$work/loadtest.log" &
tester=$!
deadline=$((SECONDS + streams / ramp + 12))
while (( $(streams_open) < streams && SECONDS < deadline )); do sleep 0.5; done
sleep 2
held=$(streams_open)
u1=$(usage); w1=$(working_set); k1=$(kmem); t1=$(tcp)
(( held > 0 )) || { echo "cgroup-memory: no stream was held" >&2; exit 1; }
echo "idle streams held      $held"
echo "usage                  $(kib "$u0" "$u1" "$held") KiB per stream ($usage_file)"
echo "working set            $(kib "$w0" "$w1" "$held") KiB per stream (usage - $inactive_key)"
echo "  kernel               $(kib "$k0" "$k1" "$held") KiB per stream ($( ((version == 1)) && echo memory.kmem.usage_in_bytes || echo 'kernel in memory.stat'))"
echo "  socket buffers       $(kib "$t0" "$t1" "$held") KiB per stream ($( ((version == 1)) && echo 'memory.kmem.tcp.usage_in_bytes, counted apart in v1' || echo 'sock in memory.stat'))"
echo "max usage so far       $(( $(cat "$cg/memory.max_usage_in_bytes" 2>/dev/null || cat "$cg/memory.peak" 2>/dev/null || echo 0) / 1024 )) KiB"

if (( stalled > 0 )); then
  # Subscribers that read their response head and then nothing: the server's
  # send buffer fills once the client's receive window is full. A publisher
  # then sends 64 events of 48 KiB, 3 MiB per stream, far more than the
  # buffers on both sides hold.
  python3 - "$addr" "$stalled" "$work/stalled.ready" <<'PY' &
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
n, ready = int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(n):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /events/stalled HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    socks.append(s)
for s in socks:
    s.settimeout(5)
    s.recv(4096)  # the head; nothing more is read
open(ready, "w").close()
time.sleep(600)
PY
  stall=$!
  for _ in $(seq 200); do [[ -f $work/stalled.ready ]] && break; sleep 0.1; done
  sleep 1
  u2=$(usage); w2=$(working_set); k2=$(kmem); t2=$(tcp)
  head -c $((48 * 1024)) /dev/zero | tr '\0' 'x' >"$work/event"
  for _ in $(seq 64); do
    exec 4<>"/dev/tcp/${addr%:*}/${addr##*:}"
    printf 'POST /publish/stalled HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n' $((48 * 1024)) >&4
    cat "$work/event" >&4
    cat <&4 >/dev/null
    exec 4<&-
  done
  sleep 3
  u3=$(usage); w3=$(working_set); k3=$(kmem); t3=$(tcp)
  echo "stalled streams        $stalled (64 events of 48 KiB published to them)"
  echo "usage                  $(kib "$u2" "$u3" "$stalled") KiB per stalled stream, after it was opened"
  echo "working set            $(kib "$w2" "$w3" "$stalled") KiB per stalled stream"
  echo "  kernel               $(kib "$k2" "$k3" "$stalled") KiB per stalled stream"
  echo "  socket buffers       $(kib "$t2" "$t3" "$stalled") KiB per stalled stream (what v2 charges to the cgroup; v1 only with kmem.tcp)"
  echo "streams open           $(streams_open) (idle and stalled)"
fi
grep -o '"held":[0-9]*' "$work/loadtest.json" 2>/dev/null | sed 's/"held":/load tester held       /' || true
