#!/usr/bin/env bash
# Soak test: a release `ssed` under connection churn for DURATION seconds,
# its RSS, descriptors and threads sampled from /proc; fails if, once every
# client has gone, RSS or descriptors stay above where they started by more
# than a margin (a leak), or if any stream failed or any event went missing.
#
#   scripts/soak.sh [DURATION_SECONDS]          (default 600)
#
# Churn: two loops of `ssed loadtest` against the server until the time is
# up. "waves" opens CHURN streams at 2,000/s, publishes 20 events at 20/s
# into them and closes them all once every delivery arrived; "flicker" opens
# 300 streams at once, holds them 1 s and closes them. Every sample also
# asks /healthz and /metrics. The server runs with a 1 s heartbeat, which
# is how it finds the clients that left (a write fails).
#
# The soak runs in rounds of ROUND seconds; after each, the churn pauses
# until every stream has closed, and the server is sampled idle (as well as
# half-way through the round, under load). A leak shows as idle RSS or
# descriptors that keep rising from round to round; retained memory shows
# as a plateau. "start" is the idle sample after a warm-up round of the
# same churn, "end" the idle sample after the last round. The warm-up
# matters: glibc keeps memory freed by exited threads in its arenas and
# caches thread stacks, so the RSS after a burst stays near that burst's
# high-water mark, to be reused by the next one.
#
# Environment: SSED (binary; default target/release/ssed, built only if
# missing: rebuild it after a change),
# CHURN (streams per wave, default 2000), WARMUP and ROUND (seconds, default
# 60 each), RSS_MARGIN_KIB (default 4096), FD_MARGIN (default 4).
set -euo pipefail
trap 'echo "soak: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."

duration=${1:-600}
churn=${CHURN:-2000}
warmup=${WARMUP:-60}
round_seconds=${ROUND:-60}
rss_margin=${RSS_MARGIN_KIB:-4096}
fd_margin=${FD_MARGIN:-4}
ssed=${SSED:-target/release/ssed}

case "$duration" in
  ''|*[!0-9]*) echo "usage: scripts/soak.sh [DURATION_SECONDS]" >&2; exit 2 ;;
esac
if [ ! -x "$ssed" ]; then
  echo "building $ssed"
  cargo build --release
fi

work=$(mktemp -d)
server_pid=
loop_pids=()
cleanup() {
  for pid in "${loop_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/ssed.toml" <<'EOF'
listen = "127.0.0.1:0"
heartbeat = "1s"
max_execution_time = "30s"
history = 1000
EOF
RUST_LOG=warn,ssed::server=info "$ssed" --config "$work/ssed.toml" 2> "$work/server.log" &
server_pid=$!
addr=
for _ in $(seq 100); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/server.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "ssed did not start:"; cat "$work/server.log"; exit 1; }
base="http://$addr"

rss()     { awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status"; }
fds()     { ls "/proc/$server_pid/fd" | wc -l; }
threads() { ls "/proc/$server_pid/task" | wc -l; }
metric()  { curl -fsS "$base/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# Waits (up to 60 s) until no stream is open and the thread count has
# settled: a closed client is found at the next heartbeat.
quiesce() {
  for _ in $(seq 600); do
    if [ "$(metric ssed_connections_open)" = 0 ]; then
      sleep 3 # let exiting threads, keep-alive and lingering answers finish
      return 0
    fi
    sleep 0.1
  done
  echo "streams still open after 60 s: $(metric ssed_connections_open)" >&2
  return 1
}

# A loadtest run that cannot finish (timeout) or fails is noted and counted.
wave() {
  timeout 120 "$ssed" loadtest --url "$base/events/soak-a" --connections "$churn" \
    --ramp 2000/s --duration 3s --publish-url "$base/publish/soak-a" --events 20 --rate 20 \
    --json >> "$work/waves.jsonl" 2>> "$work/loadtest.log" \
    || echo "wave: exit $?" >> "$work/runs-failed"
}
flicker() {
  timeout 60 "$ssed" loadtest --url "$base/events/soak-b" --connections 300 --ramp 0 \
    --duration 1s --json >> "$work/flicker.jsonl" 2>> "$work/loadtest.log" \
    || echo "flicker: exit $?" >> "$work/runs-failed"
}

cycles() { cat "$work/waves.jsonl" "$work/flicker.jsonl" 2>/dev/null | wc -l; }

# Both loops until `until` (epoch seconds), in the background.
churn() {
  local until=$1
  ( while [ "$(date +%s)" -lt "$until" ]; do wave; done ) &
  loop_pids+=($!)
  ( while [ "$(date +%s)" -lt "$until" ]; do flicker; done ) &
  loop_pids+=($!)
}
join_loops() {
  for pid in "${loop_pids[@]}"; do wait "$pid"; done
  loop_pids=()
}

# One round: churn for $1 seconds (sampling the server under load half-way),
# then wait for every stream to close and sample it idle. Prints a row.
round() {
  local name=$1 seconds=$2 t0 loaded_rss loaded_fds loaded_threads loaded_open
  t0=$(date +%s)
  churn $((t0 + seconds))
  sleep $((seconds / 2))
  loaded_rss=$(rss); loaded_fds=$(fds); loaded_threads=$(threads)
  loaded_open=$(metric ssed_connections_open)
  curl -fsS "$base/healthz" > /dev/null
  join_loops
  quiesce
  idle_rss=$(rss); idle_fds=$(fds); idle_threads=$(threads)
  printf '%-7s %8s | %9s %6s %8s %6s | %9s %6s %8s | %7s\n' "$name" "$(( $(date +%s) - began ))s" \
    "$loaded_rss" "$loaded_fds" "$loaded_threads" "$loaded_open" \
    "$idle_rss" "$idle_fds" "$idle_threads" "$(cycles)"
}

began=$(date +%s)
printf '%-7s %8s | %9s %6s %8s %6s | %9s %6s %8s | %7s\n' "" "" \
  "loaded:" "" "" "" "idle:" "" "" ""
printf '%-7s %8s | %9s %6s %8s %6s | %9s %6s %8s | %7s\n' round elapsed \
  rss_kib fds threads open rss_kib fds threads cycles
printf '%-7s %8s | %9s %6s %8s %6s | %9s %6s %8s | %7s\n' cold 0s - - - - \
  "$(rss)" "$(fds)" "$(threads)" 0
cold_rss=$(rss); cold_fds=$(fds)
round warmup "$warmup"
start_rss=$idle_rss; start_fds=$idle_fds; start_threads=$idle_threads
soak_began=$(date +%s)
n=0
while [ $(( $(date +%s) - soak_began )) -lt "$duration" ]; do
  n=$((n + 1))
  left=$(( duration - ($(date +%s) - soak_began) ))
  round "$n" $(( left < round_seconds ? (left < 10 ? 10 : left) : round_seconds ))
done
end_rss=$idle_rss; end_fds=$idle_fds; end_threads=$idle_threads

# What the clients saw, summed over every cycle.
sum() { grep -o "\"$1\":[0-9]*" "$work"/*.jsonl | awk -F: '{s += $NF} END {print s + 0}'; }
held=$(sum held); failed=$(sum failed); dropped=$(sum dropped); refused=$(sum refused)
other=$(sum other); expected=$(sum expected_deliveries); delivered=$(sum deliveries)

echo
echo "warm-up ${warmup}s, soak ${duration}s in $n rounds: $(cycles) loadtest cycles, $held streams held in all"
echo "failed $failed, dropped $dropped, refused $refused, other $other; deliveries $delivered of $expected"
echo "server RSS KiB: cold $cold_rss, start $start_rss, end $end_rss (margin $rss_margin)"
echo "server fds:     cold $cold_fds, start $start_fds, end $end_fds (margin $fd_margin)"
echo "server threads: start $start_threads, end $end_threads"
echo "server counted $(metric 'ssed_disconnects_total{reason="client"}') client disconnects"

status=0
if [ $((end_rss - start_rss)) -gt "$rss_margin" ]; then
  echo "FAIL: RSS grew $((end_rss - start_rss)) KiB"; status=1
fi
if [ $((end_fds - start_fds)) -gt "$fd_margin" ]; then
  echo "FAIL: descriptors grew by $((end_fds - start_fds))"; status=1
fi
if [ "$failed" != 0 ] || [ "$dropped" != 0 ] || [ "$refused" != 0 ] || [ "$other" != 0 ] \
   || [ "$delivered" != "$expected" ]; then
  echo "FAIL: clients saw failures or missing deliveries (see above)"; status=1
fi
if [ -s "$work/runs-failed" ]; then
  echo "FAIL: loadtest runs failed:"; sort "$work/runs-failed" | uniq -c; status=1
fi
if grep -q 'ERROR' "$work/server.log"; then
  echo "FAIL: the server logged errors:"; grep 'ERROR' "$work/server.log" | head; status=1
fi
[ "$status" = 0 ] && echo "OK: no leak within the margins"
exit "$status"
