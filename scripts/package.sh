#!/usr/bin/env bash
# Builds the installable artefact target/picloud-<version>-pg15-<arch>.tar.gz:
#
#   picloud-<version>-pg15-<arch>/
#     lib/picloud.so                     -> pg_config --pkglibdir
#     share/extension/picloud.control    -> pg_config --sharedir/extension
#     share/extension/picloud--*.sql        (install script of this version, plus every
#                                           sql/upgrades/picloud--*.sql: older install scripts
#                                           and the upgrade scripts between versions)
#     bin/picloud-supervisor
#     deploy/                            systemd unit, env file, postgresql.conf lines, grants
#     install.sh                         installs the above (see install.sh --help)
#     SHA256SUMS                         checked by install.sh before it copies anything
#
# Environment: PG_CONFIG (default /usr/bin/pg_config) must be PostgreSQL 15's.
# Prints the path of the tarball as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH=$HOME/.cargo/bin:$PATH

readonly PG_MAJOR=15
pg_config=${PG_CONFIG:-/usr/bin/pg_config}
target=${CARGO_TARGET_DIR:-$root/target}

fail() {
  echo "package.sh: $*" >&2
  exit 1
}

major=$("$pg_config" --version | awk '{ split($2, v, "."); print v[1] }')
[ "$major" = "$PG_MAJOR" ] || fail "$pg_config is PostgreSQL $major, not $PG_MAJOR"

# The version every crate inherits (version.workspace = true): [workspace.package] version.
version=$(awk '
  /^\[/ { in_section = ($0 == "[workspace.package]") }
  in_section && $1 == "version" { gsub(/"/, "", $3); print $3; exit }
' Cargo.toml)
[ -n "$version" ] || fail "no version under [workspace.package] in Cargo.toml"
arch=$(uname -m)
name=picloud-$version-pg$PG_MAJOR-$arch

echo "Building picloud $version (release) for PostgreSQL $PG_MAJOR on $arch"
cargo pgrx package -p picloud --pg-config "$pg_config"
cargo build --release -p picloud-supervisor

# cargo pgrx package lays files out as they would be installed, under target/release/picloud-pg15
# followed by the absolute pkglibdir and sharedir of the pg_config it was given.
pgrx_out=$target/release/picloud-pg$PG_MAJOR
built_lib=$pgrx_out$("$pg_config" --pkglibdir)
built_ext=$pgrx_out$("$pg_config" --sharedir)/extension
[ -f "$built_lib/picloud.so" ] || fail "cargo pgrx package made no $built_lib/picloud.so"
[ -f "$built_ext/picloud--$version.sql" ] || fail "cargo pgrx package made no picloud--$version.sql"
grep -qx "default_version = '$version'" "$built_ext/picloud.control" ||
  fail "picloud.control does not say default_version = '$version'"

stage=$target/package/$name
rm -rf "$stage"
mkdir -p "$stage/lib" "$stage/share/extension" "$stage/bin" "$stage/deploy"

cp "$built_lib/picloud.so" "$stage/lib/"
# Only this version's script: the pgrx output directory keeps those of earlier builds.
cp "$built_ext/picloud.control" "$built_ext/picloud--$version.sql" "$stage/share/extension/"
if [ -d sql/upgrades ]; then
  for script in sql/upgrades/picloud--*.sql; do
    [ -e "$script" ] || continue # the glob matched nothing
    dest=$stage/share/extension/$(basename "$script")
    # sql/upgrades may keep a copy of a released install script. If that is this version's
    # and differs from what pgrx generated, the schema changed without a version bump: a
    # database created from either would then differ silently under the same version.
    if [ -e "$dest" ] && ! cmp -s "$script" "$dest"; then
      fail "$script differs from the install script pgrx generated for $version; bump the version in Cargo.toml (or fix the copy)"
    fi
    cp "$script" "$dest"
  done
fi
cp "$target/release/picloud-supervisor" "$stage/bin/"
for file in deploy/*; do
  if [ "$(basename "$file")" = install.sh ]; then
    cp "$file" "$stage/install.sh"
  else
    cp "$file" "$stage/deploy/"
  fi
done
chmod 0755 "$stage/install.sh" "$stage/bin/picloud-supervisor" "$stage/lib/picloud.so"
chmod 0644 "$stage"/share/extension/* "$stage"/deploy/*

(cd "$stage" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)

tarball=$target/$name.tar.gz
# Root ownership and a fixed order, so the archive does not depend on who built it.
tar --owner=0 --group=0 --numeric-owner --sort=name -C "$target/package" -czf "$tarball" "$name"

echo "Contents:"
(cd "$target/package" && find "$name" -type f | LC_ALL=C sort | sed 's/^/  /')
echo "$tarball"
