#!/usr/bin/env bash
# Prerequisites of the browser test (tests/browser.rs): Chromium at
# /usr/bin/chromium and playwright-core in tests/browser/node_modules.
# Idempotent and non-interactive: installs only what is missing or stale,
# and says what it does. Needs root (or password-less sudo) for apt-get,
# and Node.js with npm already installed.
set -euo pipefail
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive

say() { printf 'browser setup: %s\n' "$*"; }
die() { printf 'browser setup: error: %s\n' "$*" >&2; exit 1; }

# --- Chromium ---------------------------------------------------------------
if [[ -x /usr/bin/chromium ]]; then
  say "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo '/usr/bin/chromium')"
else
  bash ../../scripts/apt-install.sh "browser setup" chromium
  [[ -x /usr/bin/chromium ]] || die "apt-get installed chromium but /usr/bin/chromium is still missing"
  say "installed: $(/usr/bin/chromium --version 2>/dev/null || echo '/usr/bin/chromium')"
fi

# --- playwright-core ----------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node is not installed (Node.js 20 or later is needed)"
command -v npm >/dev/null 2>&1 || die "npm is not installed"

# node_modules is stale when package-lock.json changed since the last
# `npm ci` here: the stamp holds the lockfile's hash at that time.
stamp=node_modules/.ssed-lockfile.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [[ -f node_modules/playwright-core/package.json && "$have" == "$want" ]]; then
  say "node_modules up to date (playwright-core $(node -p 'require("./node_modules/playwright-core/package.json").version'))"
else
  if [[ -d node_modules ]]; then
    say "node_modules stale (package-lock.json changed): npm ci --no-audit --no-fund"
  else
    say "node_modules missing: npm ci --no-audit --no-fund"
  fi
  npm ci --no-audit --no-fund
  printf '%s\n' "$want" >"$stamp"
  say "installed playwright-core $(node -p 'require("./node_modules/playwright-core/package.json").version')"
fi
say "ready (node $(node --version))"
