#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages a make target needs, and only those that are missing.
#
#   scripts/system-packages.sh up      Python 3.11 with venv (what `make install` needs)
#   scripts/system-packages.sh test    that, plus the tools the tests run for real: PostgreSQL
#                                      (feedback store), Prometheus and Alertmanager (alerting
#                                      loop, promtool), Chromium (status page, /docs), curl
#                                      (README examples), openssl (TLS certificates)
#   scripts/system-packages.sh bench   that, plus wrk and h2load (nghttp2-client)
#
# It installs as root, or through sudo where that works; otherwise, or on a system without
# apt-get, it prints one line that names the missing packages. Missing Python is fatal; a
# missing test tool is not (the tests that need it are skipped and listed, or fail with CI=true).
# `make up`, `make test` and `make bench` call it, so a fresh machine needs only those commands.
set -euo pipefail

target=${1:?usage: system-packages.sh up|test|bench}
case "$target" in up | test | bench) ;; *)
  echo "usage: system-packages.sh up|test|bench" >&2
  exit 2
  ;;
esac
on_ci() { case "${CI:-}" in 1 | true | TRUE | True | yes) return 0 ;; *) return 1 ;; esac }

distro=unknown
if [ -r /etc/os-release ]; then
  # shellcheck disable=SC1091
  distro=$(. /etc/os-release && echo "${ID:-unknown}")
fi

required=() # without these `make install` cannot work
optional=() # without these some tests skip (locally) or fail (CI)

# Python 3.11 with ensurepip (Debian splits venv support into pythonX.Y-venv).
python=${PYTHON:-$(command -v python3.11 || true)}
if [ -z "$python" ] || ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  required+=(python3.11 python3.11-venv)
  python=/usr/bin/python3.11
elif ! "$python" -c 'import ensurepip' 2>/dev/null; then
  required+=(python3.11-venv)
fi

# Chromium is /usr/bin/chromium on Debian and chromium-browser on Ubuntu; tests/tools.py
# looks in the same places.
have_chromium() {
  local candidate
  for candidate in chromium chromium-browser google-chrome-stable google-chrome; do
    command -v "$candidate" && return 0
  done
  for candidate in /usr/lib/chromium/chromium /usr/lib/chromium-browser/chromium-browser /snap/bin/chromium; do
    [ -x "$candidate" ] && return 0
  done
  return 1
}

if [ "$target" != up ]; then
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || optional+=(postgresql)
  { command -v prometheus && command -v promtool; } >/dev/null || optional+=(prometheus)
  { command -v prometheus-alertmanager || command -v alertmanager; } >/dev/null ||
    optional+=(prometheus-alertmanager)
  if ! have_chromium >/dev/null; then
    if [ "$distro" = ubuntu ]; then optional+=(chromium-browser); else optional+=(chromium); fi
  fi
  command -v curl >/dev/null || optional+=(curl)
  command -v openssl >/dev/null || optional+=(openssl)
fi
if [ "$target" = bench ]; then
  command -v wrk >/dev/null || optional+=(wrk)
  command -v h2load >/dev/null || optional+=(nghttp2-client)
fi

packages=("${required[@]}" "${optional[@]}")
[ ${#packages[@]} -eq 0 ] && exit 0

# One line that says what is missing, why it was not installed, and what follows.
give_up() {
  local then="the tests that need them are skipped (with CI=true they fail)"
  [ ${#required[@]} -gt 0 ] && then="the project needs Python 3.11 with venv to install"
  echo "modelloop: missing system packages: ${packages[*]}; $1; $then" >&2
  [ ${#required[@]} -gt 0 ] && exit 1
  on_ci && exit 1
  exit 0
}

command -v apt-get >/dev/null || give_up "no apt-get here: install them with your package manager"
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
  as_root=(sudo)
else
  give_up "not root and no sudo: run 'sudo apt-get install ${packages[*]}'"
fi

echo "modelloop: installing ${packages[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! { "${as_root[@]}" apt-get update -qq &&
  "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"; } >/dev/null; then
  give_up "apt-get could not install them (see above)"
fi

# Their packages start system daemons; the tests run their own on loopback ports.
for pkg in "${optional[@]}"; do
  case "$pkg" in postgresql | prometheus | prometheus-alertmanager)
    ("${as_root[@]}" service "$pkg" stop || true) >/dev/null 2>&1
    ;;
  esac
done
