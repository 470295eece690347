#!/bin/sh
# Write .env from .env.example with a fresh random secret for every `change-me`.
# Never overwrites an existing .env (idempotent); the file is created with mode 600.
# Usage: scripts/gen-env.sh [TARGET [TEMPLATE]]   (defaults: .env and .env.example
# next to this script's parent directory).
set -eu

root=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
target=${1:-"$root/.env"}
template=${2:-"$root/.env.example"}

if [ -e "$target" ]; then
    echo "gen-env: $target already exists, left unchanged"
    exit 0
fi
if [ ! -r "$template" ]; then
    echo "gen-env: template $template not found" >&2
    exit 1
fi

secret() {
    # 32 hex characters (128 bits): safe inside URLs, YAML and shell without quoting.
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex 16
    else
        python3 -c 'import secrets; print(secrets.token_hex(16))'
    fi
}

umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT INT TERM
: >"$tmp"
chmod 600 "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
    # Only assignments (NAME=value) carry placeholders; comments are copied as they are.
    case "$line" in [A-Za-z_]*=*) ;; *) printf '%s\n' "$line" >>"$tmp"; continue ;; esac
    while case "$line" in *change-me*) true ;; *) false ;; esac; do
        before=${line%%change-me*}
        after=${line#*change-me}
        line="$before$(secret)$after"
    done
    printf '%s\n' "$line" >>"$tmp"
done <"$template"
mv "$tmp" "$target"
trap - EXIT INT TERM
echo "gen-env: wrote $target (mode 600) with random secrets"
