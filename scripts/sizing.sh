#!/usr/bin/env bash
# How many streams a small VM holds: runs `ssed` (its defaults)
# inside a memory cgroup of each size, pinned to one CPU, and finds its
# limit with `ssed loadtest --find-limit --pid` from outside the cgroup.
# Prints, per size, the streams held, the p99 of delivery at that count,
# what stopped the search, and whether the server outlived it.
#
#     sudo bash scripts/sizing.sh [--server BIN] [--sizes "256M 512M 1G"]
#                                 [--max N] [--step-time D]
#
#     --server BIN    the ssed to measure (default target/static/ssed)
#     --sizes LIST    memory limits, with a unit M or G (default "256M 512M 1G")
#     --max N         stop the search there (default 20000; this machine's
#                     descriptor limit binds near 16,000 streams anyway)
#     --step-time D   time each step publishes for (default 2s)
#
# Needs root and the memory and cpuset controllers, cgroup v1
# (/sys/fs/cgroup/memory, /sys/fs/cgroup/cpuset) or v2 (both listed in the
# root's cgroup.subtree_control). The cgroups it makes (ssed-sizing-PID-SIZE)
# are removed at the end, and the server stopped by its PID, on failure too.
# The load tester runs outside them, on both CPUs. Each size takes a minute
# or two.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bin=target/static/ssed
sizes="256M 512M 1G"
max=20000
step_time=2s
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) bin=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --max) max=$2; shift 2 ;;
    --step-time) step_time=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "sizing: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "sizing: no executable at $bin (bash scripts/build-static.sh)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "sizing: needs root (cgroups)" >&2; exit 2; }

if [[ -f /sys/fs/cgroup/memory/memory.limit_in_bytes && -d /sys/fs/cgroup/cpuset ]]; then
  version=1
elif grep -qw memory /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null \
  && grep -qw cpuset /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
  version=2
else
  echo "sizing: no memory and cpuset controllers to make cgroups with" >&2
  exit 2
fi

bytes() {
  case "$1" in
    *G) echo $(( ${1%G} * 1024 * 1024 * 1024 )) ;;
    *M) echo $(( ${1%M} * 1024 * 1024 )) ;;
    *) echo "sizing: a size is a number with M or G: $1" >&2; exit 2 ;;
  esac
}

work=$(mktemp -d)
server=""
made=()
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  for ((i = ${#made[@]} - 1; i >= 0; i--)); do rmdir "${made[$i]}" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

printf '%-6s %8s %10s  %-12s %s\n' size streams "p99 (ms)" server "stopped by"
for size in $sizes; do
  limit=$(bytes "$size")
  if [[ $version == 1 ]]; then
    mem=/sys/fs/cgroup/memory/ssed-sizing-$$-$size
    cpu=/sys/fs/cgroup/cpuset/ssed-sizing-$$-$size
    mkdir "$mem"; made+=("$mem")
    mkdir "$cpu"; made+=("$cpu")
    echo "$limit" > "$mem/memory.limit_in_bytes"
    echo 0 > "$cpu/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems > "$cpu/cpuset.mems"
    join="echo \$\$ > $mem/cgroup.procs; echo \$\$ > $cpu/cgroup.procs"
  else
    cg=/sys/fs/cgroup/ssed-sizing-$$-$size
    mkdir "$cg"; made+=("$cg")
    echo "$limit" > "$cg/memory.max"
    echo 0 > "$cg/cpuset.cpus"
    join="echo \$\$ > $cg/cgroup.procs"
  fi
  printf 'listen = "127.0.0.1:0"\n' > "$work/ssed.toml"
  : > "$work/server.log"
  sh -c "$join; exec $bin --config $work/ssed.toml" 2> "$work/server.log" &
  server=$!
  addr=$(listening_addr sizing "$work/server.log")
  status=0
  "$bin" loadtest --url "http://$addr/events/sizing" --find-limit --pid "$server" \
    --max "$max" --step-time "$step_time" --json > "$work/result.json" 2> "$work/loadtest.log" \
    || status=$?
  alive=alive
  kill -0 "$server" 2>/dev/null || alive=KILLED
  cap=$(sed -n 's/.*(cap \([0-9]*\) streams, set by \([^;]*\);.*/\1, \2/p' "$work/server.log" | head -1)
  python3 - "$work/result.json" "$size" "$alive" "$cap" "$status" <<'EOF'
import json, sys
path, size, alive, cap, status = sys.argv[1:]
try:
    r = json.load(open(path))
except ValueError:
    print(f"{size:<6} {'?':>8} {'?':>10}  {alive:<12} load tester exit {status}, no report")
    sys.exit(0)
held = [s for s in r["steps"] if s["streams"] == r["limit"]]
p99 = held[-1]["p99_ms"] if held and held[-1]["p99_ms"] is not None else None
p99 = f"{p99:.1f}" if p99 is not None else "-"
print(f"{size:<6} {r['limit']:>8,} {p99:>10}  {alive:<12} {r['stopped_by']} (cap {cap})")
EOF
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
  for ((i = ${#made[@]} - 1; i >= 0; i--)); do rmdir "${made[$i]}" 2>/dev/null || true; done
  made=()
done
