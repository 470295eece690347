#!/bin/sh
# Write .env from .env.example with a fresh random secret for every `change-me`.
# Never overwrites an existing .env (idempotent): it only appends the variables the template
# has and the file lacks. The file is created with mode 600.
# Usage: scripts/gen-env.sh [TARGET [TEMPLATE]]   (defaults: .env and .env.example
# next to this script's parent directory).
set -eu

root=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
target=${1:-"$root/.env"}
template=${2:-"$root/.env.example"}

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

# A line's placeholders replaced by fresh secrets.
fill() {
    line=$1
    while case "$line" in *change-me*) true ;; *) false ;; esac; do
        before=${line%%change-me*}
        after=${line#*change-me}
        line="$before$(secret)$after"
    done
    printf '%s\n' "$line"
}

if [ -e "$target" ]; then
    # Never rewritten; only variables the template gained since it was written are
    # appended (with fresh secrets), so an older .env keeps working.
    added=""
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in [A-Za-z_]*=*) ;; *) continue ;; esac
        name=${line%%=*}
        if ! grep -q "^$name=" "$target"; then
            [ -n "$added" ] || printf '\n# Added by scripts/gen-env.sh from %s.\n' "$(basename "$template")" >>"$target"
            fill "$line" >>"$target"
            added="$added $name"
        fi
    done <"$template"
    if [ -n "$added" ]; then
        echo "gen-env: added to $target:$added"
    else
        echo "gen-env: $target already exists, left unchanged"
    fi
    exit 0
fi

umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT INT TERM
: >"$tmp"
chmod 600 "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
    # Only assignments (NAME=value) carry placeholders; comments are copied as they are.
    case "$line" in [A-Za-z_]*=*) ;; *) printf '%s\n' "$line" >>"$tmp"; continue ;; esac
    fill "$line" >>"$tmp"
done <"$template"
mv "$tmp" "$target"
trap - EXIT INT TERM
echo "gen-env: wrote $target (mode 600) with random secrets"
