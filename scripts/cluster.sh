#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster with picloud preloaded, owned by the postgres OS user.
#   scripts/cluster.sh start DIR PORT [DATABASE]   initdb if needed, start, create DATABASE
#   scripts/cluster.sh stop DIR                    fast shutdown
#   scripts/cluster.sh reach DIR                   let the postgres OS user reach DIR
# Never touches the system's own cluster: everything lives in DIR, on PORT.
set -euo pipefail
PG_BIN=$(/usr/bin/pg_config --bindir)
cmd=${1:?start|stop}
dir=${2:?data directory}
as_pg() { runuser -u postgres -- "$@"; }

# Postgres runs as the postgres OS user, which must be able to traverse every directory down
# to its data directory (repositories usually live under root-owned 0700/0750 paths).
reach() {
  local d
  d=$(cd "$1" && pwd)
  while [ "$d" != "/" ]; do
    chmod o+x "$d" 2>/dev/null || true
    d=$(dirname "$d")
  done
}

case "$cmd" in
start)
  port=${3:?port}
  db=${4:-picloud}
  mkdir -p "$(dirname "$dir")"
  reach "$(dirname "$dir")"
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >> "$dir/postgresql.conf" <<CONF
shared_preload_libraries = 'picloud'
picloud.database = '$db'
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
max_connections = 200
shared_buffers = '512MB'
fsync = on
synchronous_commit = on
log_min_messages = warning
CONF
  fi
  if ! as_pg "$PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -o "-p $port" -l "$dir/postgres.log" -w -t 60 start >/dev/null
  fi
  if ! psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc "CREATE DATABASE \"$db\"" >/dev/null
  fi
  ;;
reach)
  reach "$dir"
  ;;
stop)
  if [ -f "$dir/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null || true
  fi
  ;;
*)
  echo "usage: $0 start DIR PORT [DATABASE] | stop DIR | reach DIR" >&2
  exit 2
  ;;
esac
