#!/usr/bin/env bash
# Installs what picloud needs to build and test on Debian 12, as root.
# Idempotent and quiet when everything is already there.
set -euo pipefail

need_pkgs=()
# chromium and chromium-driver: the console's browser tests (tests/tests/console.rs).
for p in postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo pgbouncer python3 chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
  echo "setup: installing cargo-pgrx 0.18.0 (takes a few minutes)"
  cargo install cargo-pgrx --version 0.18.0 --locked --quiet
fi

if [ ! -f "${PGRX_HOME:-$HOME/.pgrx}/config.toml" ] || ! grep -q 'pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  echo "setup: configuring pgrx for the system's PostgreSQL 15"
  cargo pgrx init --pg15 /usr/bin/pg_config >/dev/null
fi

# The test and benchmark clusters listen on fixed ports (55430-55499, package-check 55991)
# inside the kernel's range for outgoing connections' local ports (32768-60999): a client
# socket that happened to take one made a cluster's start fail with "Address already in use".
# Reserved here so the kernel never hands them out (best effort: a container may not allow it).
if [ "$(cat /proc/sys/net/ipv4/ip_local_reserved_ports 2>/dev/null)" != "55430-55499,55991" ]; then
  sysctl -q -w net.ipv4.ip_local_reserved_ports=55430-55499,55991 2>/dev/null \
    || echo "setup: could not reserve the test ports 55430-55499 (they may collide with outgoing connections)" >&2
fi
