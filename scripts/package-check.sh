#!/usr/bin/env bash
# Checks the installable package end to end, without touching this machine's PostgreSQL:
#
#   1. builds it with scripts/package.sh;
#   2. the tarball holds exactly the expected files, each identical to what was built or
#      written in the repository, and its SHA256SUMS is right;
#   3. install.sh --with-service into a DESTDIR puts exactly those files where pg_config says,
#      with the right modes, and leaves the real directories alone; a second run keeps an
#      edited env file; --supervisor-only needs no pg_config; a pg_config of another major
#      version and a damaged file are refused;
#   4. systemd-analyze verify accepts the unit (when systemd-analyze is installed);
#   5. a throwaway PostgreSQL 15 server runs from a copy of this machine's PostgreSQL 15 tree
#      into which install.sh put the package (postgres finds its library and share
#      directories relative to its own binary, so that copy is self-contained): the library
#      preloads, CREATE EXTENSION and ALTER EXTENSION UPDATE from every older install script
#      work, grants.sql runs twice, and the packaged supervisor, configured from the packaged
#      env file, runs an event enqueued by the application role and stops cleanly on SIGTERM.
#
# The server runs as the postgres OS user, listens on a Unix socket in a temporary directory
# only (no TCP port), and is stopped, with everything else, on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

readonly PG_MAJOR=15
pg_config=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
pg_bin=$("$pg_config" --bindir)
pkglibdir=$("$pg_config" --pkglibdir)
sharedir=$("$pg_config" --sharedir)
extdir=$sharedir/extension
target=${CARGO_TARGET_DIR:-$root/target}
# Only names the socket file: the server listens on no TCP port.
readonly PORT=55991

work=$(mktemp -d /tmp/picloud-package-check.XXXXXX)
# The postgres OS user must reach the data directory and the server tree inside.
chmod 0755 "$work"
supervisor_pid=

cleanup() {
  if [ -n "$supervisor_pid" ] && kill -0 "$supervisor_pid" 2>/dev/null; then
    kill -KILL "$supervisor_pid"
  fi
  if [ -f "$work/data/postmaster.pid" ]; then
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/data" -m immediate -w stop >/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

ok() { echo "ok    $*"; }
fail() {
  echo "FAIL  $*" >&2
  exit 1
}
# The same file content, or fail naming both.
same() {
  cmp -s "$1" "$2" || fail "$1 differs from $2"
}

# --- 1. Build -----------------------------------------------------------------------------------
if ! scripts/package.sh >"$work/package.log" 2>&1; then
  tail -20 "$work/package.log" >&2
  fail "scripts/package.sh failed"
fi
tarball=$(tail -1 "$work/package.log")
[ -f "$tarball" ] || fail "package.sh did not name a tarball (last line: $tarball)"
version=$(awk '
  /^\[/ { in_section = ($0 == "[workspace.package]") }
  in_section && $1 == "version" { gsub(/"/, "", $3); print $3; exit }
' Cargo.toml)
name=picloud-$version-pg$PG_MAJOR-$(uname -m)
[ "$(basename "$tarball")" = "$name.tar.gz" ] || fail "tarball is $(basename "$tarball"), expected $name.tar.gz"
ok "built $tarball ($(du -h "$tarball" | cut -f1))"

# --- 2. Tarball contents ------------------------------------------------------------------------
# Expected files, package path <TAB> where the same bytes are in the repository or the build.
built=$target/release/picloud-pg$PG_MAJOR
{
  printf '%s\t%s\n' lib/picloud.so "$built$pkglibdir/picloud.so"
  printf '%s\t%s\n' share/extension/picloud.control "$built$extdir/picloud.control"
  printf '%s\t%s\n' "share/extension/picloud--$version.sql" "$built$extdir/picloud--$version.sql"
  for script in sql/upgrades/picloud--*.sql; do
    [ -e "$script" ] || continue
    [ "$(basename "$script")" = "picloud--$version.sql" ] && continue # compared with pgrx's above
    printf '%s\t%s\n' "share/extension/$(basename "$script")" "$root/$script"
  done
  printf '%s\t%s\n' bin/picloud-supervisor "$target/release/picloud-supervisor"
  printf '%s\t%s\n' install.sh "$root/deploy/install.sh"
  for file in deploy/*; do
    [ "$(basename "$file")" = install.sh ] && continue
    printf '%s\t%s\n' "$file" "$root/$file"
  done
} | LC_ALL=C sort >"$work/expected"
(cut -f1 "$work/expected"; echo SHA256SUMS) | LC_ALL=C sort >"$work/expected-names"

tar -tzf "$tarball" | grep -v '/$' | sed "s|^$name/||" | LC_ALL=C sort >"$work/tar-names"
if ! diff -u "$work/expected-names" "$work/tar-names" >"$work/names.diff"; then
  cat "$work/names.diff" >&2
  fail "tarball file list differs from the expected one (- expected, + in tarball)"
fi
ok "tarball holds exactly the $(wc -l <"$work/tar-names") expected files: $(tr '\n' ' ' <"$work/tar-names")"

mkdir "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked"
pkg=$work/unpacked/$name
while IFS=$'\t' read -r path source; do
  same "$pkg/$path" "$source"
done <"$work/expected"
ok "every packaged file is identical to its source (pgrx output, sql/upgrades, deploy/, release supervisor)"
(cd "$pkg" && sha256sum --quiet --check SHA256SUMS) || fail "SHA256SUMS does not match the packaged files"
ok "SHA256SUMS matches"

# --- 3. install.sh into a DESTDIR ---------------------------------------------------------------
real_paths=("$pkglibdir/picloud.so" "$extdir"/picloud* /usr/local/bin/picloud-supervisor
  /etc/systemd/system/picloud-supervisor.service /etc/picloud/picloud-supervisor.env)
fingerprint() {
  local path
  for path in "${real_paths[@]}"; do
    if [ -e "$path" ]; then
      echo "$path $(stat -c '%i %Y %s' "$path")"
    else
      echo "$path absent"
    fi
  done
}
fingerprint >"$work/real-before"

stage=$work/stage
DESTDIR=$stage PG_CONFIG=$pg_config "$pkg/install.sh" --with-service >"$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "install.sh --with-service with DESTDIR failed"; }

# Installed path <TAB> packaged file <TAB> mode.
{
  printf '%s\t%s\t%s\n' "$pkglibdir/picloud.so" lib/picloud.so 755
  for file in "$pkg"/share/extension/*; do
    printf '%s\t%s\t%s\n' "$extdir/$(basename "$file")" "share/extension/$(basename "$file")" 644
  done
  printf '%s\t%s\t%s\n' /usr/local/bin/picloud-supervisor bin/picloud-supervisor 755
  printf '%s\t%s\t%s\n' /etc/systemd/system/picloud-supervisor.service deploy/picloud-supervisor.service 644
  printf '%s\t%s\t%s\n' /etc/picloud/picloud-supervisor.env deploy/picloud-supervisor.env 640
} | LC_ALL=C sort >"$work/installed-expected"
(cd "$stage" && find . -type f | sed 's|^\.||' | LC_ALL=C sort) >"$work/installed-names"
if ! diff -u <(cut -f1 "$work/installed-expected") "$work/installed-names" >"$work/installed.diff"; then
  cat "$work/installed.diff" >&2
  fail "install.sh installed a different set of files (- expected, + installed)"
fi
while IFS=$'\t' read -r path packaged mode; do
  same "$stage$path" "$pkg/$packaged"
  actual=$(stat -c '%a' "$stage$path")
  [ "$actual" = "$mode" ] || fail "$stage$path has mode $actual, expected $mode"
done <"$work/installed-expected"
ok "install.sh --with-service (DESTDIR) installed exactly $(wc -l <"$work/installed-names") files, identical to the packaged ones, with their modes:"
sed 's/^/        /' "$work/installed-names"

fingerprint >"$work/real-after"
diff -u "$work/real-before" "$work/real-after" >&2 ||
  fail "a real destination changed while install.sh ran with DESTDIR"
ok "the real destinations ($pkglibdir, $extdir, /usr/local/bin, /etc/systemd/system, /etc/picloud) are untouched"

echo "# edited by the operator" >>"$stage/etc/picloud/picloud-supervisor.env"
DESTDIR=$stage PG_CONFIG=$pg_config "$pkg/install.sh" --with-service >"$work/install2.log" 2>&1 ||
  { cat "$work/install2.log" >&2; fail "second install.sh run failed"; }
grep -q '^# edited by the operator$' "$stage/etc/picloud/picloud-supervisor.env" ||
  fail "a second install.sh run overwrote the edited env file"
ok "a second install.sh run keeps an existing env file"

# A supervisor-only host may have no PostgreSQL at all: point PG_CONFIG at nothing.
DESTDIR=$work/supervisor-host PG_CONFIG=$work/no-such-pg_config "$pkg/install.sh" --supervisor-only \
  --with-service >"$work/install-supervisor.log" 2>&1 ||
  { cat "$work/install-supervisor.log" >&2; fail "install.sh --supervisor-only --with-service failed"; }
supervisor_files=$(cd "$work/supervisor-host" && find . -type f | sed 's|^\.||' | LC_ALL=C sort | tr '\n' ' ')
[ "$supervisor_files" = "/etc/picloud/picloud-supervisor.env /etc/systemd/system/picloud-supervisor.service /usr/local/bin/picloud-supervisor " ] ||
  fail "install.sh --supervisor-only --with-service installed: $supervisor_files"
ok "install.sh --supervisor-only --with-service (no pg_config) installed only: $supervisor_files"

printf '#!/bin/sh\necho "PostgreSQL 16.4"\n' >"$work/pg_config-16"
chmod 0755 "$work/pg_config-16"
if DESTDIR=$work/refused PG_CONFIG=$work/pg_config-16 "$pkg/install.sh" >"$work/refused.log" 2>&1; then
  fail "install.sh accepted a PostgreSQL 16 pg_config"
fi
[ ! -e "$work/refused" ] || fail "install.sh refused PostgreSQL 16 but still wrote files"
ok "install.sh refuses a pg_config of PostgreSQL 16 and writes nothing: $(head -1 "$work/refused.log")"

cp -r "$pkg" "$work/damaged"
echo "-- tampered" >>"$work/damaged/share/extension/picloud--$version.sql"
if DESTDIR=$work/refused PG_CONFIG=$pg_config "$work/damaged/install.sh" >"$work/damaged.log" 2>&1; then
  fail "install.sh installed a file that does not match SHA256SUMS"
fi
[ ! -e "$work/refused" ] || fail "install.sh found a damaged file but still wrote files"
ok "install.sh refuses a package whose files differ from SHA256SUMS and writes nothing"

# --- 4. systemd unit ----------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
  # verify insists that ExecStart exists, so point it at the staged binary; every other line
  # is checked as installed.
  sed "s|^ExecStart=/usr/local/bin/|ExecStart=$stage/usr/local/bin/|" \
    "$stage/etc/systemd/system/picloud-supervisor.service" >"$work/picloud-supervisor.service"
  # Unknown keys are only warnings (exit status 0), so any output at all counts as failure.
  if ! systemd-analyze verify "$work/picloud-supervisor.service" >"$work/verify.log" 2>&1 ||
    [ -s "$work/verify.log" ]; then
    cat "$work/verify.log" >&2
    fail "systemd-analyze verify rejected the unit"
  fi
  ok "systemd-analyze verify: no errors or warnings ($(systemctl --version | head -1))"
else
  echo "skip  systemd-analyze is not installed: the unit was not verified"
fi

# --- 5. A server running from the installed files -----------------------------------------------
server=$work/server
mkdir -p "$server$pg_bin" "$server$pkglibdir" "$server$sharedir"
cp "$pg_bin/postgres" "$server$pg_bin/"
find "$pkglibdir" -maxdepth 1 -name '*.so' ! -name 'picloud*' -exec cp {} "$server$pkglibdir/" \;
cp -r "$sharedir/." "$server$sharedir/"
rm -f "$server$extdir"/picloud*
DESTDIR=$server PG_CONFIG=$pg_config "$pkg/install.sh" >"$work/install-server.log" 2>&1 ||
  { cat "$work/install-server.log" >&2; fail "install.sh into the server tree failed"; }

db=picloud_check
mkdir "$work/data" "$work/sock"
chown postgres:postgres "$work/data" "$work/sock"
runuser -u postgres -- "$pg_bin/initdb" -D "$work/data" -U postgres --auth=trust -E UTF8 \
  --locale=C.UTF-8 >"$work/initdb.log" 2>&1 || { cat "$work/initdb.log" >&2; fail "initdb failed"; }
# The packaged postgresql.conf lines, with the database this check uses.
sed "s/^picloud.database = 'app'$/picloud.database = '$db'/" "$pkg/deploy/postgresql.conf.sample" \
  >"$work/picloud.conf"
grep -q "^picloud.database = '$db'$" "$work/picloud.conf" ||
  fail "postgresql.conf.sample has no line picloud.database = 'app' to adapt"
{
  cat "$work/picloud.conf"
  echo "listen_addresses = ''"
  echo "unix_socket_directories = '$work/sock'"
} >>"$work/data/postgresql.conf"
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/data" -p "$server$pg_bin/postgres" -o "-p $PORT" \
  -l "$work/data/server.log" -w -t 60 start >/dev/null ||
  { tail -20 "$work/data/server.log" >&2; fail "the server did not start"; }

psql_as() {
  local user=$1 database=$2
  shift 2
  psql -X -q -v ON_ERROR_STOP=1 -h "$work/sock" -p "$PORT" -U "$user" -d "$database" "$@"
}
query() { psql_as postgres "$@" -At; }

shared=$(query postgres -c "SELECT setting FROM pg_config WHERE name = 'SHAREDIR'")
libs=$(query postgres -c "SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'")
[ "$shared" = "$server$sharedir" ] || fail "the server uses SHAREDIR $shared, not the installed $server$sharedir"
[ "$libs" = "$server$pkglibdir" ] || fail "the server uses PKGLIBDIR $libs, not the installed $server$pkglibdir"
# The postmaster itself loads shared_preload_libraries; its pid is postmaster.pid's first line.
postmaster=$(head -1 "$work/data/postmaster.pid")
mapped=$(awk '/picloud\.so$/ { print $6; exit }' "/proc/$postmaster/maps")
[ "$mapped" = "$server$pkglibdir/picloud.so" ] ||
  fail "the postmaster mapped '$mapped', not the installed $server$pkglibdir/picloud.so"
ok "server started from the DESTDIR tree; shared_preload_libraries loaded $mapped"

query postgres -c "CREATE DATABASE $db"
query "$db" -c "CREATE EXTENSION picloud"
installed=$(query "$db" -c "SELECT extversion FROM pg_extension WHERE extname = 'picloud'")
[ "$installed" = "$version" ] || fail "CREATE EXTENSION picloud installed $installed, expected $version"
ok "CREATE EXTENSION picloud: version $installed"

for script in "$pkg"/share/extension/picloud--*.sql; do
  from=$(basename "$script" .sql)
  from=${from#picloud--}
  # Install scripts only (picloud--A.sql); picloud--A--B.sql are the upgrade steps.
  case "$from" in *--* | "$version") continue ;; esac
  upgrade_db=picloud_from_${from//./_}
  query postgres -c "CREATE DATABASE $upgrade_db"
  query "$upgrade_db" -c "CREATE EXTENSION picloud VERSION '$from'" -c "ALTER EXTENSION picloud UPDATE"
  reached=$(query "$upgrade_db" -c "SELECT extversion FROM pg_extension WHERE extname = 'picloud'")
  [ "$reached" = "$version" ] || fail "ALTER EXTENSION picloud UPDATE from $from reached $reached, not $version"
  ok "CREATE EXTENSION picloud VERSION '$from' then ALTER EXTENSION picloud UPDATE: version $reached"
done

housekeepers=0
for _ in $(seq 50); do
  housekeepers=$(query "$db" -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'picloud housekeeper' AND datname = '$db'")
  [ "$housekeepers" = 1 ] && break
  sleep 0.2
done
[ "$housekeepers" = 1 ] || fail "no picloud housekeeper serves $db"
ok "the picloud housekeeper serves $db (picloud.database from postgresql.conf.sample)"

for run in first second; do
  psql_as postgres "$db" -f "$pkg/deploy/grants.sql" >"$work/grants-$run.log" 2>&1 ||
    { cat "$work/grants-$run.log" >&2; fail "grants.sql failed on its $run run"; }
done
roles=$(query "$db" -c "
  SELECT concat_ws(' ',
    (SELECT rolcanlogin AND rolbypassrls FROM pg_roles WHERE rolname = 'picloud_supervisor'),
    pg_has_role('picloud_operator', 'picloud_admin', 'MEMBER'),
    pg_has_role('example_app', 'picloud_user', 'MEMBER'),
    (SELECT count(*) FROM picloud.apps WHERE name = 'example'),
    (SELECT string_agg(capability, ',') FROM picloud.app_roles WHERE role_name = 'example_app'))")
[ "$roles" = "t t t 1 admin" ] ||
  fail "after grants.sql: supervisor login+bypassrls, operator in picloud_admin, app role in picloud_user, apps named example, capabilities = '$roles', expected 't t t 1 admin'"
ok "grants.sql ran twice: picloud_supervisor can log in, picloud_operator is in picloud_admin, example_app administers the one app 'example'"

# The application role registers a SQL handler and enqueues; the packaged supervisor, with the
# packaged env file and only the connection string replaced, must run it as that role.
query "$db" -c "
  CREATE TABLE public.deploy_check (event_id uuid NOT NULL, principal name NOT NULL);
  CREATE FUNCTION public.deploy_check_handler(e jsonb) RETURNS jsonb LANGUAGE sql AS
    \$\$ INSERT INTO public.deploy_check VALUES ((e->>'event_id')::uuid, current_user) RETURNING '{}'::jsonb \$\$;
  GRANT SELECT, INSERT ON public.deploy_check TO example_app;"
event=$(psql_as example_app "$db" -At <<'SQL'
SELECT app_id FROM picloud.picloud_list_apps() WHERE name = 'example' \gset
SELECT picloud.picloud_create_script(:'app_id', 'deploy-check', 'sql', 'public.deploy_check_handler') AS script_id \gset
SELECT picloud.picloud_enqueue(:'app_id', 'enqueue', 'check', '{"n": 1}', p_script_id => :'script_id');
SQL
)
[ -n "$event" ] || fail "example_app could not enqueue"

(
  set -a
  # shellcheck source=/dev/null
  . "$stage/etc/picloud/picloud-supervisor.env"
  set +a
  PICLOUD_DATABASE_URL="host=$work/sock port=$PORT user=picloud_supervisor dbname=$db"
  exec "$stage/usr/local/bin/picloud-supervisor"
) 2>"$work/supervisor.log" &
supervisor_pid=$!
handled=
for _ in $(seq 100); do
  handled=$(query "$db" -c "SELECT principal FROM public.deploy_check WHERE event_id = '$event'")
  [ -n "$handled" ] && break
  kill -0 "$supervisor_pid" 2>/dev/null || break
  sleep 0.2
done
[ "$handled" = example_app ] ||
  { tail -20 "$work/supervisor.log" >&2; fail "the supervisor did not run event $event as example_app"; }
kill -TERM "$supervisor_pid"
status=0
wait "$supervisor_pid" || status=$?
supervisor_pid=
[ "$status" = 0 ] || { tail -20 "$work/supervisor.log" >&2; fail "the supervisor exited with $status after SIGTERM"; }
left=$(query "$db" -c "SELECT count(*) FROM picloud.outbox")
[ "$left" = 0 ] || fail "$left events left in the outbox"
ok "packaged supervisor (packaged env file, user picloud_supervisor) ran event $event as example_app, exited 0 on SIGTERM, outbox empty"

runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null
ok "server stopped; all checks passed for $name"
