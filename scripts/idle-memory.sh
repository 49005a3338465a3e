#!/usr/bin/env bash
# What an idle daemon subscriber costs: holds N streams against a running
# `ssed` with `ssed loadtest` and reports, per stream, the server's RSS, its
# threads and memory maps, how many stack pages each stream thread keeps
# resident (from /proc/PID/pagemap), and the machine's memory as the kernel
# accounts it (/proc/meminfo: MemAvailable, anonymous pages, slab, kernel
# stacks, page tables).
#
#     bash scripts/idle-memory.sh [--server BIN] [--streams N] [--set LINE]...
#
#     --server BIN   the ssed to measure (default target/release/ssed; the
#                    static build is target/static/ssed)
#     --streams N    streams to hold (default 10000)
#     --set LINE     a line added to the server's config, e.g.
#                    --set 'heartbeat = "15s"' (repeatable)
#     --path PATH    what each stream asks for (default /events/idle; a
#                    Mercure subscriber: '/.well-known/mercure?topic=idle')
#     --bearer TOKEN the subscribers' Bearer token (a JWT, say, with
#                    --set '[auth]' --set 'jwt_secret = "..."'); the server
#                    does not see it as its own subscribe token
#     --https        serve HTTPS (a throwaway certificate made with openssl)
#                    and hold the streams with scripts/tls-hold.py (python3's
#                    ssl: `ssed loadtest` opens http:// only so far); the
#                    machine-wide figures then include that client's TLS
#                    state too: compare the server's own RSS line
#     --drop-caches  as root: write back and drop the page cache first
#                    (sync; echo 3 > /proc/sys/vm/drop_caches), so it cannot
#                    shrink under the measurement and pass for free memory
#
# The server runs with heartbeats and the execution-time budget off (unless
# --set says otherwise), on a free loopback port; the load tester is the same binary. Both are stopped
# by PID at the end, and the run is bounded (about N/5000 + 15 seconds).
# MemAvailable on a VM moves by tens of megabytes on its own (page cache,
# balloon): run it more than once, and read the slab and kernel-stack lines,
# which do not drift. Linux only; needs python3 for the pagemap reading.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bin=target/release/ssed
streams=10000
extra=()
drop_caches=0
bearer=""
path=/events/idle
https=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) bin=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --set) extra+=("$2"); shift 2 ;;
    --drop-caches) drop_caches=1; shift ;;
    --bearer) bearer=$2; shift 2 ;;
    --path) path=$2; shift 2 ;;
    --https) https=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "idle-memory: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "idle-memory: no executable at $bin (cargo build --release, or scripts/build-static.sh)" >&2; exit 2; }
[[ $streams =~ ^[0-9]+$ && $streams -gt 0 ]] || { echo "idle-memory: --streams wants a positive number" >&2; exit 2; }
[[ $path == /* ]] || { echo "idle-memory: --path wants a path starting with /" >&2; exit 2; }

work=$(mktemp -d)
server=""; tester=""
cleanup() {
  [[ -n $tester ]] && kill "$tester" 2>/dev/null || true
  [[ -n $server ]] && kill "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

{
  # The defaults first: a --set line may open a table ([auth]).
  declare -A set_keys=()
  for line in "${extra[@]}"; do set_keys[${line%%=*}]=1; done
  [[ -n ${set_keys["heartbeat "]:-} ]] || printf 'heartbeat = "0"\n'
  [[ -n ${set_keys["max_execution_time "]:-} ]] || printf 'max_execution_time = "0"\n'
  for line in "${extra[@]}"; do printf '%s\n' "$line"; done
} >"$work/ssed.toml"
if (( https )); then
  # A CA and a leaf for localhost, P-256 as most certificates are now.
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$work/ca.key" -out "$work/ca.pem" -days 1 -subj /CN=idle-memory-ca 2>/dev/null
  openssl req -new "${ec[@]}" -keyout "$work/key.pem" -out "$work/leaf.csr" -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$work/leaf.ext"
  openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 1 -extfile "$work/leaf.ext" -out "$work/cert.pem" 2>/dev/null
  printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$work/cert.pem" "$work/key.pem" >>"$work/ssed.toml"
fi
env -u SSED_SUBSCRIBE_TOKEN RUST_LOG=info "$bin" --config "$work/ssed.toml" --listen 127.0.0.1:0 2>"$work/server.log" &
server=$!
addr=$(listening_addr idle-memory "$work/server.log")
sleep 0.5

meminfo() { awk '$3 == "kB" { printf "%s %s\n", $1, $2 }' /proc/meminfo; }
status() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$server/status"; }
# The server's open streams, from /healthz (bash's /dev/tcp: no curl needed).
streams_open() {
  local host=${addr%:*} port=${addr##*:} reply
  if (( https )); then
    curl -s --max-time 5 --cacert "$work/ca.pem" --resolve "localhost:$port:$host" \
      "https://localhost:$port/healthz" | sed -n 's/.*"streams_open":\([0-9]*\).*/\1/p' | head -1
    return
  fi
  exec 3<>"/dev/tcp/$host/$port" || { echo 0; return; }
  printf 'GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n' >&3
  reply=$(cat <&3)
  exec 3<&-
  sed -n 's/.*"streams_open":\([0-9]*\).*/\1/p' <<<"$reply" | head -1
}
# Bytes held by each slab cache (its slabs' pages), where readable.
slabs() { awk 'NR > 2 { print $1, $15 * $6 * 4096 }' /proc/slabinfo 2>/dev/null || true; }
free_kb() { awk '$1 == "MemFree:" { print $2 }' /proc/meminfo; }
if (( drop_caches )); then
  sync
  echo 3 >/proc/sys/vm/drop_caches || { echo "idle-memory: --drop-caches needs root" >&2; exit 2; }
fi
# A previous run's threads and sockets go away lazily (RCU, TIME_WAIT):
# wait (at most 30 s) until free memory holds still (within 2 MiB) for two
# seconds, or it flows into the figures below.
for _ in $(seq 15); do
  m0=$(free_kb); sleep 2; m1=$(free_kb)
  (( m1 - m0 < 2048 && m0 - m1 < 2048 )) && break
done
meminfo >"$work/before"
slabs >"$work/slab-before"
rss0=$(status VmRSS); threads0=$(status Threads); maps0=$(wc -l <"/proc/$server/maps")

ramp=5000
hold=$((streams / ramp + 10))
if (( https )); then
  python3 scripts/tls-hold.py "$addr" "$path" "$streams" "$hold" "$work/ca.pem" "$bearer" \
    >"$work/loadtest.json" 2>"$work/loadtest.log" &
else
  SSED_SUBSCRIBE_TOKEN=$bearer "$bin" loadtest --url "http://$addr$path" --connections "$streams" --ramp "$ramp/s" \
    --duration "${hold}s" --json >"$work/loadtest.json" 2>"$work/loadtest.log" &
fi
tester=$!
# Wait until every stream is held, then settle.
deadline=$((SECONDS + hold - 3))
while (( $(streams_open) < streams && SECONDS < deadline )); do sleep 0.5; done
sleep 2
meminfo >"$work/after"
slabs >"$work/slab-after"
rss1=$(status VmRSS); threads1=$(status Threads); maps1=$(wc -l <"/proc/$server/maps")
held=$(streams_open)

python3 - "$server" "$work/before" "$work/after" "$held" "$rss0" "$rss1" "$maps0" "$maps1" "$work/slab-before" "$work/slab-after" <<'PY'
import struct, sys
pid, before, after, held = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rss0, rss1, maps0, maps1 = (int(x) for x in sys.argv[5:9])
slab_before, slab_after = sys.argv[9], sys.argv[10]
if held <= 0:
    sys.exit("idle-memory: no stream was held")
read = lambda p: {k.rstrip(':'): int(v) for k, v in (l.split() for l in open(p))}
b, a = read(before), read(after)
per = lambda k: (a[k] - b[k]) / held
print(f"streams held           {held}")
print(f"server RSS             {(rss1 - rss0) / held:6.2f} KiB per stream")
print(f"server memory maps     {(maps1 - maps0) / held:6.2f} per stream")
# Resident pages of each thread stack. Stacks are the private anonymous
# mappings with a guard page just below them, and all of one size (the
# most common size among those); the allocator's guarded regions are not.
maps = [l.split() for l in open(f"/proc/{pid}/maps")]
pm = open(f"/proc/{pid}/pagemap", "rb")
stacks = []
for prev, cur in zip(maps, maps[1:]):
    lo, hi = (int(x, 16) for x in cur[0].split('-'))
    phi = int(prev[0].split('-')[1], 16)
    if cur[1] == 'rw-p' and len(cur) == 5 and prev[1] == '---p' and phi == lo:
        stacks.append((lo, hi))
sizes = {}
for lo, hi in stacks:
    sizes[hi - lo] = sizes.get(hi - lo, 0) + 1
# Thread stacks are at least 32 KiB (ssed's floor); the signal stacks
# beside them are smaller.
big = {s: n for s, n in sizes.items() if s >= 32 * 1024}
size = max(big, key=big.get) if big else 0
hist = {}
for lo, hi in stacks:
    if hi - lo != size:
        continue
    n = size // 4096
    pm.seek(lo // 4096 * 8)
    data = pm.read(n * 8)
    resident = sum((struct.unpack_from('<Q', data, i * 8)[0] >> 63) & 1 for i in range(n))
    hist[resident] = hist.get(resident, 0) + 1
pages = ", ".join(f"{v} with {k}" for k, v in sorted(hist.items()))
print(f"stack pages resident   {pages} ({size // 1024} KiB stacks)")
used = lambda m: m["MemTotal"] - m["MemFree"] - m["Buffers"] - m["Cached"]
print(f"memory in use          {(used(a) - used(b)) / held:6.2f} KiB per stream (MemTotal - MemFree - Buffers - Cached)")
print(f"MemAvailable           {-per('MemAvailable'):6.2f} KiB per stream (drop)")
for k in ("Cached", "AnonPages", "Slab", "SUnreclaim", "SReclaimable", "KernelStack", "PageTables"):
    print(f"  {k:20} {per(k):6.2f} KiB per stream")
# The kernel's own accounting does not drift with the VM's free memory.
counted = sum(per(k) for k in ("AnonPages", "Slab", "KernelStack", "PageTables"))
print(f"accounted              {counted:6.2f} KiB per stream (AnonPages + Slab + KernelStack + PageTables; "
      f"{counted - per('SReclaimable'):.2f} without reclaimable slab)")
# The slab caches that grew most, per stream (needs a readable /proc/slabinfo).
rows = lambda p: {n: int(v) for n, v in (l.split() for l in open(p))}
sb, sa = rows(slab_before), rows(slab_after)
grew = sorted(((sa[n] - sb.get(n, 0)) / held / 1024, n) for n in sa)
top = [(kib, n) for kib, n in reversed(grew) if kib >= 0.1][:10]
if top:
    print("  slab caches: " + ", ".join(f"{n} {kib:.2f}" for kib, n in top) + " (KiB per stream)")
PY
echo "server threads         $threads0 -> $threads1 (one per stream, besides the hub's waker threads, which start with it)"
frag=$(cat /proc/sys/net/core/high_order_alloc_disable 2>/dev/null || echo "?")
echo "net.core.high_order_alloc_disable = $frag (1 makes TCP page fragments 4 KiB instead of 32: deploy/sysctl.d/ssed.conf)"
grep -o '"held":[0-9]*' "$work/loadtest.json" | sed 's/"held":/load tester held       /' || true
