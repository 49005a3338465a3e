#!/usr/bin/env bash
# How long a vanished subscriber holds its stream: runs ssed on this side of
# a veth pair, one subscriber (`ssed loadtest`) in a network namespace of
# its own, cuts the subscriber off without a FIN or RST, and prints the
# seconds until ssed lets the stream go (polling /healthz).
#
#     sudo bash scripts/dead-peer.sh [--server PATH] [--heartbeat 15s]
#                                    [--write-timeout 10s] [--cut link|drop]
#
# --cut link: the subscriber's link goes down (a phone that loses its
# network); --cut drop: its packets are dropped while the link stays up (a
# peer that stops acknowledging). Defaults: the release binary, ssed's own
# defaults (heartbeat 15 s, write timeout 10 s), link. ssed's bound is
# heartbeat + write_timeout and a few seconds.
#
# Needs root and `ip` (iproute2). Uses the namespace ssed-deadpeer-$$ and
# the addresses 10.234.0.1-2/30; removes them, and stops both processes by
# PID, on exit. Gives up after heartbeat + write timeout + 60 s.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

server=target/release/ssed
heartbeat=15s
write_timeout=10s
cut=link
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) server=$2; shift 2 ;;
    --heartbeat) heartbeat=$2; shift 2 ;;
    --write-timeout) write_timeout=$2; shift 2 ;;
    --cut) cut=$2; shift 2 ;;
    *) echo "usage: $0 [--server PATH] [--heartbeat D] [--write-timeout D] [--cut link|drop]" >&2; exit 2 ;;
  esac
done
[[ $cut == link || $cut == drop ]] || { echo "--cut is link or drop" >&2; exit 2; }
[[ -x $server ]] || { echo "no $server: cargo build --release (or --server PATH)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "needs root (network namespaces)" >&2; exit 2; }
secs() { # "15s" "250ms" "2m" "0" -> whole seconds
  case "$1" in
    *ms) echo $(( ${1%ms} / 1000 )) ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *) echo "$1" ;;
  esac
}

ns=ssed-deadpeer-$$
outer=sdpo$$
inner=sdpi$$
dir=$(mktemp -d)
ssed_pid=""
client_pid=""
cleanup() {
  [[ -n $client_pid ]] && kill "$client_pid" 2>/dev/null || true
  [[ -n $ssed_pid ]] && kill "$ssed_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$outer" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

ip netns add "$ns"
ip link add "$outer" type veth peer name "$inner" netns "$ns"
ip addr add 10.234.0.1/30 dev "$outer"
ip link set "$outer" up
ip netns exec "$ns" ip addr add 10.234.0.2/30 dev "$inner"
ip netns exec "$ns" ip link set "$inner" up
ip netns exec "$ns" ip link set lo up

cat > "$dir/ssed.toml" <<EOF
listen = "10.234.0.1:0"
heartbeat = "$heartbeat"
write_timeout = "$write_timeout"
max_execution_time = "0"
EOF
RUST_LOG=info "$server" --config "$dir/ssed.toml" 2> "$dir/ssed.log" &
ssed_pid=$!
addr=$(listening_addr dead-peer "$dir/ssed.log")

open() {
  curl -s "http://$addr/healthz" | sed -n 's/.*"streams_open":\([0-9]*\).*/\1/p'
}
ip netns exec "$ns" "$server" loadtest --url "http://$addr/events/dead-peer" \
  --connections 1 --duration 1h > /dev/null 2>&1 &
client_pid=$!
for _ in $(seq 100); do
  [[ $(open) == 1 ]] && break
  sleep 0.1
done
[[ $(open) == 1 ]] || { echo "the subscriber never got its stream" >&2; exit 1; }
sleep 1

case $cut in
  link) ip netns exec "$ns" ip link set "$inner" down ;;
  drop) ip netns exec "$ns" ip route replace blackhole 10.234.0.1/32 ;;
esac
start=$(date +%s.%N)
limit=$(( $(secs "$heartbeat") + $(secs "$write_timeout") + 60 ))
while [[ $(open) != 0 ]]; do
  now=$(date +%s.%N)
  if (( $(echo "$now - $start > $limit" | bc) )); then
    echo "still open after ${limit}s" >&2
    exit 1
  fi
  sleep 0.2
done
freed=$(echo "$(date +%s.%N) - $start" | bc)
reasons=$(curl -s "http://$addr/metrics" | grep '^ssed_disconnects_total' | grep -v ' 0$' || true)
printf 'heartbeat %s, write_timeout %s, cut %s: stream freed %.1f s after the cut\n%s\n' \
  "$heartbeat" "$write_timeout" "$cut" "$freed" "$reasons"
