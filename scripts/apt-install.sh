#!/usr/bin/env bash
# Installs Debian packages with apt-get, non-interactively, as root or
# through password-less sudo; says what it does. Used by the setup scripts
# of the tests that need a program from the distribution.
#
#     bash scripts/apt-install.sh WHO PACKAGE...     # WHO prefixes messages
set -euo pipefail

who=$1
shift
die() { printf '%s: error: %s\n' "$who" "$*" >&2; exit 1; }

if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo -n)
else
  die "cannot install $*: this is not root, and there is no sudo"
fi
command -v apt-get >/dev/null 2>&1 || die "cannot install $*: there is no apt-get"
printf '%s: installing %s: apt-get update -qq && apt-get install -y -qq %s\n' "$who" "$*" "$*"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" </dev/null
