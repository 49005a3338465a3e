#!/usr/bin/env bash
# Prerequisite of the nginx test (tests/deploy.rs): an `nginx` binary on the
# PATH (or at /usr/sbin/nginx). Idempotent and non-interactive: installs it
# with apt-get only when missing, and says what it does. Needs root (or
# password-less sudo). The test runs its own nginx on 127.0.0.1 with a
# private configuration; the system service is neither needed nor used.
set -euo pipefail

say() { printf 'nginx setup: %s\n' "$*"; }
die() { printf 'nginx setup: error: %s\n' "$*" >&2; exit 1; }

found=$(command -v nginx || true)
[[ -z "$found" && -x /usr/sbin/nginx ]] && found=/usr/sbin/nginx
if [[ -n "$found" ]]; then
  say "nginx present: $("$found" -v 2>&1)"
  exit 0
fi
bash "$(dirname "$0")/../../scripts/apt-install.sh" "nginx setup" nginx
[[ -x /usr/sbin/nginx ]] || die "apt-get installed nginx but /usr/sbin/nginx is missing"
say "installed: $(/usr/sbin/nginx -v 2>&1)"
