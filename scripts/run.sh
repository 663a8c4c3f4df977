#!/usr/bin/env bash
# Runs picloud locally: a throwaway PostgreSQL 15 cluster under .picloud/ with the extension
# preloaded and created in database "picloud", and picloud-supervisor attached in the
# foreground. Ctrl-C (or SIGTERM) stops the supervisor and the cluster.
#   PICLOUD_PORT   port of the local cluster (default 55433)
#   scripts/run.sh stop    stops a cluster left running
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
port=${PICLOUD_PORT:-55433}
data="$root/.picloud/data"

if [ "${1:-}" = "stop" ]; then
  bash scripts/cluster.sh stop "$data"
  exit 0
fi

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "building picloud (release)..."
bash scripts/install-extension.sh --release
cargo build -q --release -p picloud-supervisor

mkdir -p "$root/.picloud"
bash scripts/cluster.sh reach "$root/.picloud"
# Restart so the cluster loads the library just installed.
bash scripts/cluster.sh stop "$data"
bash scripts/cluster.sh start "$data" "$port" picloud
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud -qc "CREATE EXTENSION IF NOT EXISTS picloud" >/dev/null
# A cluster kept from an earlier run may hold an older version of the extension.
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud -qc "ALTER EXTENSION picloud UPDATE" >/dev/null
psql -h 127.0.0.1 -p "$port" -U postgres -d picloud -q -v ON_ERROR_STOP=1 -f scripts/dev-database.sql >/dev/null

cleanup() {
  bash scripts/cluster.sh stop "$data"
  echo "picloud stopped"
}
trap cleanup EXIT

cat <<MSG

picloud is running.
  cluster:    $data (PostgreSQL 15, port $port, picloud preloaded)
  connect:    psql -h 127.0.0.1 -p $port -U postgres picloud
  log:        $data/postgres.log
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
  --poll-interval-ms 5000 &
supervisor=$!
trap 'kill -TERM $supervisor 2>/dev/null || true' INT TERM
wait $supervisor || true
