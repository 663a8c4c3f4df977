#!/usr/bin/env bash
# The console at 1,000,000 dead letters in one app (tests/src/bin/console-bench.rs): the
# dead-letter list through the API and as a page, first and 500th page, 100 requests each,
# p50/p99/max of the console's own time (its Server-Timing header, database included) and the
# client's round trip. Starts its own scram-only cluster (port 55480, or
# PICLOUD_CONSOLE_BENCH_PORT; the console takes the next port). Uses the installed extension:
# run scripts/test.sh or scripts/install-extension.sh --release first. About 2 minutes.
#   BENCH_DEAD_LETTERS=N   how many dead letters (default 1000000)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p "$root/target"
bash scripts/cluster.sh reach "$root/target"
cargo build -q --release -p picloud-console -p picloud-tests --bin picloud-console --bin console-bench
PICLOUD_CONSOLE_BIN="$root/target/release/picloud-console" "$root/target/release/console-bench"
