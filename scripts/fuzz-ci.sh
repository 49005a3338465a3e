#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a few seconds: a smoke test that
# the targets build, start from their seed corpora and find no crash in that
# time. Longer runs and their figures are in fuzz/README.md.
#
# Needs the nightly toolchain (libFuzzer's instrumentation); installs
# cargo-fuzz when it is missing. Under CI=true a missing nightly is an error;
# elsewhere the script says so and stops without failing.
#
#   bash scripts/fuzz-ci.sh               # every target, 10 s each
#   FUZZ_SECONDS=60 bash scripts/fuzz-ci.sh config
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
seconds=${FUZZ_SECONDS:-10}
all_targets=(request_head event_roundtrip config publish_query resp_reply grants)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

if ! nightly=$(rustup run nightly rustc --version 2>&1); then
  echo "fuzz-ci: no nightly toolchain (rustup run nightly rustc: $nightly)" >&2
  if [ "${CI:-}" = "true" ]; then
    echo "fuzz-ci: FAILED: cargo-fuzz needs nightly; install it with 'rustup toolchain install nightly'" >&2
    exit 1
  fi
  echo "fuzz-ci: skipped (not under CI=true)" >&2
  exit 0
fi
echo "fuzz-ci: $nightly"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-ci: installing cargo-fuzz"
  cargo install --locked cargo-fuzz </dev/null
fi
cargo fuzz --version

# libFuzzer adds what it finds to the first corpus directory: use a scratch
# one, so the checkout's seed corpora (fuzz/corpus/<target>) stay as they are.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

dict_for() {
  case "$1" in
    request_head | publish_query) echo "-dict=fuzz/dict/http.dict" ;;
    config) echo "-dict=fuzz/dict/config.dict" ;;
    resp_reply) echo "-dict=fuzz/dict/resp.dict" ;;
  esac
}

cargo +nightly fuzz build </dev/null

declare -A stats
failed=()
for target in "${targets[@]}"; do
  echo
  echo "==> fuzz $target for ${seconds}s"
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  # -timeout: one input running this long is a hang, reported as a crash.
  if cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
      $(dict_for "$target") </dev/null >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$target")
    # The crash report, the input and how to reproduce it.
    tail -n 60 "$log"
  fi
  final=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  [ -n "$final" ] || final=$(grep -E '^#[0-9]+[[:space:]].*cov:' "$log" | tail -n 1 || true)
  stats[$target]="$status ${final:-no stats line}"
  echo "$target: ${stats[$target]}"
done

echo
echo "==> fuzz summary (${seconds}s per target)"
for target in "${targets[@]}"; do
  echo "$target: ${stats[$target]}"
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz-ci: FAILED: ${failed[*]} (inputs kept under fuzz/artifacts/)" >&2
  exit 1
fi
