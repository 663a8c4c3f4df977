#!/usr/bin/env bash
# Runs picloud locally: a throwaway PostgreSQL 15 cluster under .picloud/ with the extension
# preloaded and created in database "picloud", picloud-console (the admin API and dashboard)
# in the background, and picloud-supervisor attached in the foreground. Ctrl-C (or SIGTERM)
# stops the supervisor, the console and the cluster.
#   PICLOUD_PORT          port of the local cluster (default 55433)
#   PICLOUD_METRICS_PORT  port of the supervisor's metrics and health endpoint (default 55434)
#   PICLOUD_CONSOLE_PORT  port of the console on 127.0.0.1 (default 55435)
#   PICLOUD_KEEP=1        keep the cluster of the previous run instead of starting afresh
#   scripts/run.sh stop    stops a cluster left running
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
port=${PICLOUD_PORT:-55433}
metrics_port=${PICLOUD_METRICS_PORT:-55434}
console_port=${PICLOUD_CONSOLE_PORT:-55435}
data="$root/.picloud/data"

if [ "${1:-}" = "stop" ]; then
  bash scripts/cluster.sh stop "$data"
  exit 0
fi

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "building picloud (release)..."
bash scripts/install-extension.sh --release
cargo build -q --release -p picloud-supervisor -p picloud-console

mkdir -p "$root/.picloud"
bash scripts/cluster.sh reach "$root/.picloud"
# A throwaway cluster: started afresh every time, so it loads the library just installed and
# never carries a schema from an unreleased build. PICLOUD_KEEP=1 keeps the previous one (its
# extension is then moved on with ALTER EXTENSION picloud UPDATE).
bash scripts/cluster.sh stop "$data"
if [ "${PICLOUD_KEEP:-0}" != "1" ]; then
  rm -rf "$data"
fi
bash scripts/cluster.sh start "$data" "$port" picloud
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud -qc "CREATE EXTENSION IF NOT EXISTS picloud" >/dev/null
# A cluster kept from an earlier run may hold an older version of the extension.
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud -qc "ALTER EXTENSION picloud UPDATE" >/dev/null
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud -q -v ON_ERROR_STOP=1 -f scripts/dev-database.sql >/dev/null

# The console listens on loopback only: this throwaway cluster trusts every local connection
# (no password is checked), which the console finds out at start-up and says in its log.
"$root/target/release/picloud-console" \
  --database-url "host=127.0.0.1 port=$port dbname=picloud sslmode=disable" \
  --listen "127.0.0.1:$console_port" 2>"$root/.picloud/console.log" &
console=$!

cleanup() {
  kill -TERM "$console" 2>/dev/null || true
  bash scripts/cluster.sh stop "$data"
  echo "picloud stopped"
}
trap cleanup EXIT

cat <<MSG

picloud is running.
  cluster:    $data (PostgreSQL 15, port $port, picloud preloaded)
  connect:    psql -h 127.0.0.1 -p $port -U postgres picloud
  log:        $data/postgres.log
  metrics:    curl -s 127.0.0.1:$metrics_port/metrics   (health: curl -s 127.0.0.1:$metrics_port/health)
  console:    http://127.0.0.1:$console_port/   (sign in with a Postgres role; log: .picloud/console.log)
  supervisor: attached below; Ctrl-C stops it and the cluster.

Try:
  SELECT picloud_create_app('demo') AS app \gset
  CREATE TABLE greetings (id serial PRIMARY KEY, who text);
  CREATE FUNCTION greet(e jsonb) RETURNS void LANGUAGE sql
    AS \$\$ INSERT INTO greetings (who) VALUES (e->'payload'->>'who') \$\$;
  SELECT picloud_create_script(:'app', 'greet', 'sql', 'greet') AS script \gset
  SELECT picloud_enqueue(:'app', 'queue', 'hello', '{"who": "world"}', :'script');
  SELECT * FROM greetings;

MSG
"$root/target/release/picloud-supervisor" \
  --database-url "host=127.0.0.1 port=$port user=postgres dbname=picloud" \
  --poll-interval-ms 5000 --metrics-listen "127.0.0.1:$metrics_port" &
supervisor=$!
trap 'kill -TERM $supervisor 2>/dev/null || true' INT TERM
wait $supervisor || true
