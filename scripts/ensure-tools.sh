#!/usr/bin/env bash
# Installs the system tools the test suite runs for real, when missing and we are root:
# Prometheus/promtool (Debian package), PostgreSQL 15 server binaries, wrk (benchmarks).
# Without root it only says what is missing; the tests then fail naming what to install.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -x "${PG_BIN:-/usr/lib/postgresql/15/bin}/initdb" ] || missing+=(postgresql-15)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)

[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-tools: missing ${missing[*]}; install them (e.g. sudo apt-get install -y ${missing[*]})" >&2
  exit 0
fi
echo "ensure-tools: installing ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
