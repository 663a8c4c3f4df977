#!/usr/bin/env bash
# Runs every picloud test on this machine, installing what is missing first:
#   1. supervisor and console unit tests;
#   2. the extension's #[pg_test]s (pgrx starts its own cluster as the postgres user);
#   3. integration tests under tests/ against a throwaway cluster with picloud preloaded and
#      real picloud-supervisor processes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

port=${PICLOUD_TEST_PORT:-55439}
cluster="$root/target/it-cluster"
mkdir -p "$root/target"
# The postgres OS user must reach the data directories under the repository.
bash scripts/cluster.sh reach "$root/target"

echo "== supervisor and console unit tests"
cargo test -q -p picloud-supervisor -p picloud-console

echo "== extension tests (pgrx)"
mkdir -p "$root/target/pgrx-test-data"
chown postgres:postgres "$root/target/pgrx-test-data"
cargo pgrx test pg15 -p picloud --runas postgres --pgdata "$root/target/pgrx-test-data"

echo "== integration tests"
bash scripts/install-extension.sh
cargo build -q -p picloud-supervisor -p picloud-console
# A cluster left over from an interrupted run is stopped and started afresh so it loads the
# library just installed.
bash scripts/cluster.sh stop "$cluster"
rm -rf "$cluster"
# Rust errors must not carry backtraces even where the environment asks for them
# (tests/tests/hostile.rs): the cluster runs with RUST_BACKTRACE=1.
RUST_BACKTRACE=1 bash scripts/cluster.sh start "$cluster" "$port" picloud_it
trap 'bash scripts/cluster.sh stop "$cluster"' EXIT
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud_it -qc "CREATE EXTENSION IF NOT EXISTS picloud"
# The tests create many databases; a short naptime lets autovacuum visit the outbox within
# the bloat scenario's wait (the default visits each database once a minute).
psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc "ALTER SYSTEM SET autovacuum_naptime = '10s'"
psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qAtc "SELECT pg_reload_conf()" >/dev/null
PICLOUD_TEST_PORT=$port PICLOUD_TEST_DATA="$cluster" PICLOUD_TEST_WORKER_DB=picloud_it \
  cargo test -p picloud-tests -- --test-threads="${PICLOUD_TEST_THREADS:-2}" --nocapture
