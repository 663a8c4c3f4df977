#!/usr/bin/env bash
# Builds and installs the picloud extension into this machine's PostgreSQL 15
# (pg_config --pkglibdir and --sharedir), together with the install scripts of earlier
# versions and the upgrade scripts between versions (sql/upgrades/), which pgrx does not copy:
# without them CREATE EXTENSION picloud VERSION '<older>' and ALTER EXTENSION picloud UPDATE
# cannot work.
#   scripts/install-extension.sh            debug build
#   scripts/install-extension.sh --release  release build
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
pg_config=/usr/bin/pg_config
# Unlink the old library first: pgrx overwrites it in place, and a running cluster that has it
# mapped (any test cluster left running) would crash on the changed pages. Unlinked, the old
# file lives on for those processes and the new one gets a fresh inode.
rm -f "$("$pg_config" --pkglibdir)/picloud.so"
cargo pgrx install -p picloud --pg-config "$pg_config" "$@" >/dev/null
install -m 0644 sql/upgrades/picloud--*.sql "$("$pg_config" --sharedir)/extension/"
