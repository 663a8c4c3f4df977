#!/usr/bin/env bash
# Benchmarks picloud against plain-SQL baselines on a throwaway cluster of its own and prints
# one table (median of 3 runs, min–max). Results also go to target/bench/results.md,
# target/bench/results.json and the chart target/bench/p1_l1.png.
#   BENCH_QUICK=1        short smoke run (seconds per case, fewer events)
#   BENCH_RUNS=N         runs per case (default 3)
#   PICLOUD_BENCH_PORT   cluster port (default 55450)
# A full run takes about 14 minutes on 2 cores (estimated); BENCH_QUICK=1 a few.
# Diagnosis knobs (see tests/src/bin/picloud-bench/main.rs): BENCH_ONLY=E1,L1, BENCH_L1_GAP_MS, BENCH_B1_WAIT_S.
# For comparing builds in one hour: PICLOUD_BENCH_SUPERVISOR and PICLOUD_BENCH_BIN name other
# binaries than the ones this script builds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

port=${PICLOUD_BENCH_PORT:-55450}
db=picloud_bench
cluster="$root/target/bench-cluster"
out="$root/target/bench"
mkdir -p "$root/target" "$out"
# The postgres OS user must reach the data directory under the repository.
bash scripts/cluster.sh reach "$root/target"

echo "== building (release)"
bash scripts/install-extension.sh --release
cargo build -q --release -p picloud-supervisor
cargo build -q --release -p picloud-tests --bin picloud-bench

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "== installing matplotlib for the chart"
  python3 -m pip install -q matplotlib || echo "bench: matplotlib could not be installed; no chart" >&2
fi

echo "== starting the benchmark cluster on port $port"
# A cluster left over from an interrupted run is stopped and recreated so that it loads the
# library just installed and starts from empty tables.
bash scripts/cluster.sh stop "$cluster"
rm -rf "$cluster"
trap 'bash scripts/cluster.sh stop "$cluster"' EXIT
bash scripts/cluster.sh start "$cluster" "$port" "$db"
psql -h 127.0.0.1 -p "$port" -U postgres -d "$db" -qc "CREATE EXTENSION IF NOT EXISTS picloud" >/dev/null

echo "== machine"
echo "nproc:  $(nproc)"
echo "cpu:    $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1024/1024}' /proc/meminfo)"
echo "load:   $(cut -d' ' -f1-3 /proc/loadavg)"
echo "source: commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified tracked file(s)"
echo "== cluster settings"
psql -h 127.0.0.1 -p "$port" -U postgres -d "$db" -AtF ' = ' -c "
  SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings
  WHERE name IN ('server_version', 'shared_buffers', 'synchronous_commit', 'fsync', 'max_connections',
                 'wal_level', 'max_wal_size', 'autovacuum_naptime')
     OR name LIKE 'picloud.%'
  ORDER BY name"

echo "== running picloud-bench${BENCH_QUICK:+ (BENCH_QUICK=$BENCH_QUICK)}"
status=0
PICLOUD_BENCH_PORT=$port PICLOUD_BENCH_DB=$db BENCH_OUT=$out \
  PICLOUD_BENCH_SUPERVISOR="${PICLOUD_BENCH_SUPERVISOR:-$root/target/release/picloud-supervisor}" \
  "${PICLOUD_BENCH_BIN:-$root/target/release/picloud-bench}" || status=$?

if [ -f "$out/results.json" ] && python3 -c 'import matplotlib' 2>/dev/null; then
  python3 - "$out/results.json" "$out/p1_l1.png" <<'PY' || echo "bench: chart failed" >&2
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

doc = json.load(open(sys.argv[1]))
chart = doc.get("chart", {})
quick = " (quick run)" if doc["meta"].get("quick") else ""
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))

def bars(ax, labels, stats, colors, unit):
    meds = [s["median"] if s and s.get("median") is not None else 0 for s in stats]
    lo = [m - (s["min"] if s and s.get("min") is not None else m) for m, s in zip(meds, stats)]
    hi = [(s["max"] if s and s.get("max") is not None else m) - m for m, s in zip(meds, stats)]
    ax.bar(labels, meds, yerr=[lo, hi], capsize=6, color=colors)
    positive = [m for m in meds if m > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
        unit += " (log scale)"
    for i, (m, h) in enumerate(zip(meds, hi)):
        ax.annotate(f"{m:,.0f}" if m >= 100 else f"{m:.2f}", (i, m), ha="left", va="bottom",
                    xytext=(8, 2), textcoords="offset points")
    ax.set_ylabel(unit)

p1 = chart.get("p1")
if p1:
    bars(ax1, ["picloud SQL", "picloud HTTP", "plain DELETE (bigserial)"],
         [p1.get("picloud_sql"), p1.get("picloud_http"), p1.get("plain")],
         ["#4c72b0", "#55a868", "#8c8c8c"], "events/s")
ax1.set_title("P1 processing throughput" + quick)
l1 = chart.get("l1")
if l1:
    bars(ax2, ["p50", "p99"], [l1.get("p50"), l1.get("p99")], ["#4c72b0", "#c44e52"], "ms")
    ax2.axhline(2.0, color="#4c72b0", ls="--", lw=1, label="p50 target 2.0 ms")
    ax2.axhline(3.5, color="#c44e52", ls="--", lw=1, label="p99 target 3.5 ms")
    ax2.legend(loc="upper left")
ax2.set_title("L1 enqueue-to-handler latency" + quick)
fig.text(0.5, 0.01, "median of runs, whiskers min–max", ha="center", fontsize=8)
fig.tight_layout(rect=(0, 0.03, 1, 1))
fig.savefig(sys.argv[2], dpi=110)
print("bench: wrote " + sys.argv[2])
PY
fi
exit $status
