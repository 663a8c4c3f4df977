#!/usr/bin/env bash
# Installs picloud from this unpacked package.
#
#   ./install.sh                   the extension and the supervisor binary
#   ./install.sh --with-service    also the systemd unit, a sample environment file and the
#                                  picloud system user the unit runs as
#   ./install.sh --supervisor-only skip the extension (and pg_config): for hosts that run
#                                  only supervisors; combine with --with-service
#
# Environment:
#   PG_CONFIG  pg_config of the PostgreSQL 15 server to install into. Default: the first of
#              /usr/lib/postgresql/15/bin/pg_config (Debian, Ubuntu), /usr/pgsql-15/bin/pg_config
#              (PGDG RPMs), then pg_config on PATH. Debian's /usr/bin/pg_config answers for the
#              newest installed version, which need not be 15: hence the order.
#   DESTDIR    staging root put in front of every destination (for building OS packages or
#              checking the layout); empty installs onto this machine.
#
# Destinations:
#   $(pg_config --pkglibdir)/picloud.so
#   $(pg_config --sharedir)/extension/picloud.control, picloud--*.sql
#   /usr/local/bin/picloud-supervisor
#   with --with-service: /etc/systemd/system/picloud-supervisor.service and
#   /etc/picloud/picloud-supervisor.env (only if absent: it holds your configuration).
set -euo pipefail

# The library is built against PostgreSQL 15's server ABI; another major version refuses it.
readonly PG_MAJOR=15
readonly BINDIR=/usr/local/bin
readonly UNITDIR=/etc/systemd/system
readonly CONFDIR=/etc/picloud

here=$(cd "$(dirname "$0")" && pwd)
destdir=${DESTDIR:-}

# Prints the comment block at the top of this file.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

with_service=no
with_extension=yes
for arg in "$@"; do
  case "$arg" in
    --with-service) with_service=yes ;;
    --supervisor-only) with_extension=no ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

find_pg_config() {
  if [ -n "${PG_CONFIG:-}" ]; then
    echo "$PG_CONFIG"
    return
  fi
  local candidate
  for candidate in "/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" "/usr/pgsql-$PG_MAJOR/bin/pg_config"; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
  if command -v pg_config >/dev/null; then
    command -v pg_config
    return
  fi
  echo "install.sh: no pg_config found; set PG_CONFIG=/path/to/pg_config of PostgreSQL $PG_MAJOR" >&2
  exit 1
}

# A file damaged or changed since packaging must not reach the server.
if ! (cd "$here" && sha256sum --quiet --check SHA256SUMS); then
  echo "install.sh: files differ from SHA256SUMS; nothing installed." >&2
  exit 1
fi

# Copies SRC to DEST with MODE through a temporary name in the same directory and a rename.
# A running server has the old picloud.so mapped: writing into that file in place could crash
# it, while a rename leaves the old inode to it until it restarts.
put() {
  local mode=$1 src=$2 dest=$3
  install -D -m "$mode" "$src" "$dest.picloud-new"
  mv -f "$dest.picloud-new" "$dest"
  echo "  $dest"
}

if [ "$with_extension" = yes ]; then
  pg_config=$(find_pg_config)
  # "PostgreSQL 15.20 (Debian 15.20-0+deb12u1)" -> 15
  version=$("$pg_config" --version)
  major=$(echo "$version" | awk '{ split($2, v, "."); print v[1] }')
  if [ "$major" != "$PG_MAJOR" ]; then
    echo "install.sh: $pg_config is for '$version'; this package is for PostgreSQL $PG_MAJOR." >&2
    echo "Set PG_CONFIG to the pg_config of a PostgreSQL $PG_MAJOR installation." >&2
    exit 1
  fi
  pkglibdir=$("$pg_config" --pkglibdir)
  extdir=$("$pg_config" --sharedir)/extension
  echo "Installing picloud for $version (pg_config: $pg_config)${destdir:+ into DESTDIR=$destdir}:"
  put 0755 "$here/lib/picloud.so" "$destdir$pkglibdir/picloud.so"
  for file in "$here"/share/extension/*; do
    put 0644 "$file" "$destdir$extdir/$(basename "$file")"
  done
else
  echo "Installing the picloud supervisor only${destdir:+ into DESTDIR=$destdir}:"
fi
put 0755 "$here/bin/picloud-supervisor" "$destdir$BINDIR/picloud-supervisor"

if [ "$with_service" = yes ]; then
  put 0644 "$here/deploy/picloud-supervisor.service" "$destdir$UNITDIR/picloud-supervisor.service"
  env_file=$destdir$CONFDIR/picloud-supervisor.env
  env_created=no
  if [ -e "$env_file" ]; then
    echo "  $env_file (kept: already exists; compare with $here/deploy/picloud-supervisor.env)"
  else
    put 0640 "$here/deploy/picloud-supervisor.env" "$env_file"
    env_created=yes
  fi
  if [ -n "$destdir" ]; then
    echo "DESTDIR set: not creating the picloud user, not reloading systemd."
  else
    if ! id -u picloud >/dev/null 2>&1; then
      nologin=$(command -v nologin || echo /bin/false)
      useradd --system --user-group --no-create-home --home-dir / --shell "$nologin" picloud
      echo "  created system user picloud"
    fi
    # The env file holds the database password: readable by the service, not by everyone.
    if [ "$env_created" = yes ]; then
      chgrp picloud "$env_file"
    fi
    if [ -d /run/systemd/system ]; then
      systemctl daemon-reload
    fi
  fi
fi

echo
echo "Next steps:"
if [ "$with_extension" = yes ]; then
  echo "  - postgresql.conf: see $here/deploy/postgresql.conf.sample (shared_preload_libraries, picloud.database);"
  echo "    restart PostgreSQL to load a new or changed library."
  echo "  - New database: CREATE EXTENSION picloud; then psql -f $here/deploy/grants.sql."
  echo "    Upgrade: ALTER EXTENSION picloud UPDATE; in each database that has it."
fi
if [ "$with_service" = yes ]; then
  echo "  - Edit $CONFDIR/picloud-supervisor.env, then: systemctl enable --now picloud-supervisor"
  echo "    (after an upgrade: systemctl restart picloud-supervisor)"
fi
