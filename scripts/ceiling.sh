#!/usr/bin/env bash
# The ceiling of one ssed process on this machine: as many streams as one
# process's descriptors allow, one thread each, an event fanned out to all.
#
#     sudo bash scripts/ceiling.sh [--server BIN] [--streams N] [--cap N]
#                                  [--events M] [--source A-B]
#
#     --server BIN   the ssed to measure (default target/static/ssed)
#     --streams N    streams the load tester asks for (default: the
#                    descriptor hard limit, 20,000 here)
#     --cap N        the server's max_connections (default: the hard limit
#                    less 100, the descriptors one process keeps for its
#                    listener, log and connections still sending a head)
#     --events M     events published to all, one a second (default 5)
#     --source A-B   the load tester's source addresses (default
#                    127.0.0.2-127.0.0.5: one gives about 28,000 ports)
#
# As root it raises vm.max_map_count (to 262,144: four maps a stream
# thread) and kernel.pid_max (to 4,194,304: a thread a stream) and puts
# the old values back on exit; it sets the descriptor limit to the hard
# limit (`ulimit -n`; root cannot raise that one here). It first starts the
# server on its defaults and prints the cap it derives and which limit set
# it (the log line), then starts it with max_connections = --cap and holds
# --streams with `ssed loadtest` (past the load tester's own descriptor
# limit, worker processes), publishes --events at 1/s, and prints: streams
# held, time to open them, the server's RSS per stream (its peak, VmHWM,
# less its idle RSS), the machine's memory per stream (the lowest
# MemAvailable during the hold against before; both ends of every loopback
# connection and the load tester included), and the delivery p50, p99 and
# max, the max being the time the slowest event took to reach every
# stream. The report page is left in the work directory it names.
#
# Both processes are stopped by PID at the end, on failure too. The run is
# bounded (about 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bin=target/static/ssed
hard=$(ulimit -Hn)
streams=$hard
cap=""
events=5
source_range=127.0.0.2-127.0.0.5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) bin=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --cap) cap=$2; shift 2 ;;
    --events) events=$2; shift 2 ;;
    --source) source_range=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "ceiling: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "ceiling: no executable at $bin (bash scripts/build-static.sh)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "ceiling: needs root (sysctls)" >&2; exit 2; }
[[ $hard =~ ^[0-9]+$ ]] || { echo "ceiling: the descriptor hard limit is '$hard'" >&2; exit 2; }
[[ -n $cap ]] || cap=$((hard - 100))
for n in "$streams" "$cap" "$events"; do
  [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || { echo "ceiling: '$n' is not a positive number" >&2; exit 2; }
done

work=$(mktemp -d)
server=""; sampler=""
old_maps=$(sysctl -n vm.max_map_count)
old_pids=$(sysctl -n kernel.pid_max)
cleanup() {
  [[ -n $sampler ]] && kill "$sampler" 2>/dev/null || true
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  sysctl -qw vm.max_map_count="$old_maps" kernel.pid_max="$old_pids" || true
  echo "ceiling: vm.max_map_count $(sysctl -n vm.max_map_count), kernel.pid_max $(sysctl -n kernel.pid_max) (restored)" >&2
}
trap cleanup EXIT
(( old_maps >= 262144 )) || sysctl -qw vm.max_map_count=262144
(( old_pids >= 4194304 )) || sysctl -qw kernel.pid_max=4194304
ulimit -n "$hard"

# Starts the server with the config in $work/ssed.toml; sets $server, $addr.
start() {
  : >"$work/server.log"
  env -u SSED_SUBSCRIBE_TOKEN -u SSED_PUBLISH_TOKEN "$bin" --config "$work/ssed.toml" 2>"$work/server.log" &
  server=$!
  addr=$(listening_addr ceiling "$work/server.log")
}
stop() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)," \
  "descriptor limit $hard, vm.max_map_count $(sysctl -n vm.max_map_count), kernel.pid_max $(sysctl -n kernel.pid_max)"

printf 'listen = "127.0.0.1:0"\n' >"$work/ssed.toml"
start
echo "defaults: $(sed -n 's/.*\(stream cap .*\)/\1/p' "$work/server.log" | head -1)"
stop

printf 'listen = "127.0.0.1:0"\nmax_connections = %s\n' "$cap" >"$work/ssed.toml"
start
sleep 0.5
rss0=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$server/status")
avail0=$(awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo)
# The lowest MemAvailable while the streams are held.
( low=$avail0
  while kill -0 "$server" 2>/dev/null; do
    a=$(awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo)
    (( a < low )) && { low=$a; echo "$low" >"$work/avail-low"; }
    sleep 0.2
  done ) &
sampler=$!
status=0
"$bin" loadtest --url "http://$addr/events/ceiling" --connections "$streams" --ramp 5000/s \
  --source "$source_range" --publish-url "http://$addr/publish/ceiling" --events "$events" --rate 1 \
  --duration 2s --pid "$server" --report "$work/ceiling.html" --json \
  >"$work/result.json" 2>"$work/loadtest.log" || status=$?
hwm=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$server/status")
kill "$sampler" 2>/dev/null || true; sampler=""
low=$(cat "$work/avail-low" 2>/dev/null || echo "$avail0")
grep -q 'worker processes' "$work/loadtest.log" && grep 'worker processes' "$work/loadtest.log" | head -1 | sed 's/^/load tester: /'
python3 - "$work/result.json" "$rss0" "$hwm" "$avail0" "$low" "$cap" "$status" <<'EOF'
import json, sys
path, rss0, hwm, avail0, low, cap, status = sys.argv[1:]
try:
    r = json.load(open(path))
except ValueError:
    sys.exit(f"ceiling: the load tester (exit {status}) gave no report")
held = r["held"]
if held <= 0:
    sys.exit("ceiling: no stream was held")
lat = r["latency_ms"] or {}
print(f"cap (max_connections)  {int(cap):,}")
print(f"streams held           {held:,} of {r['connections']:,} asked ({r['refused']:,} refused, {r['failed']} failed, {r['dropped']} dropped)")
print(f"time to open them      {r['ramp_s']} s (at 5,000/s)")
print(f"server RSS             {int(rss0) / 1024:.1f} MiB idle, {int(hwm) / 1024:.1f} MiB at its peak: "
      f"{(int(hwm) - int(rss0)) / held:.2f} KiB per stream")
print(f"machine memory         {(int(avail0) - int(low)) / held:.1f} KiB per stream (MemAvailable, both ends and the load tester)")
print(f"deliveries             {r['deliveries']:,} of {r['expected_deliveries']:,} ({r['published']} events to {r['streams_publishing']:,} streams)")
every = r["deliveries"] == r["expected_deliveries"]
reach = "the time for an event to reach every stream" if every else "NOT every delivery arrived"
print(f"delivery latency       p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, max {lat.get('max')} ms ({reach})")
print(f"load tester            {r['workers']} worker processes, {r['client_cpu_s']} s CPU, peak RSS {r['client_peak_rss_kib'] / 1024:.0f} MiB")
EOF
echo "report: $work/ceiling.html (and $work/result.json)"
stop
