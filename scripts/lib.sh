# Shared by the measuring scripts: `source "$(dirname "$0")/lib.sh"`.

# The address a starting `ssed` listens on, from its log (the `listening on
# ADDR (...)` line), waiting up to 5 seconds; on failure, says so with the
# log on stderr, prefixed by NAME, and exits 1.
#     addr=$(listening_addr NAME LOGFILE)
listening_addr() {
  local name=$1 log=$2 addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*listening on \([0-9.:]*\) .*/\1/p' "$log" | head -1)
    [[ -n $addr ]] && { printf '%s\n' "$addr"; return 0; }
    sleep 0.05
  done
  echo "$name: the server did not start:" >&2
  cat "$log" >&2
  exit 1
}
