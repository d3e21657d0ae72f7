#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# Real PostgreSQL clients drive the server tests: psql, and pgbench (which
# Debian ships with the server package).
psql --version >/dev/null 2>&1 || need_apt+=(postgresql-client)
pgbench --version >/dev/null 2>&1 || need_apt+=(postgresql)
# The postgres engine runs Debian's PostgreSQL (server binaries under
# /usr/lib/postgresql) on atrest-fs, a FUSE filesystem; as root atrest
# mounts it directly, fuse3 gives fusermount3 to everyone else.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing packages: ${need_apt[*]} (install them with apt-get)" >&2
    exit 1
  fi
fi

# Python clients used by interop tests (azure SDK, psycopg, ...).
if [ -s scripts/requirements-test.txt ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-test.txt
fi

if [ ! -c /dev/fuse ]; then
  echo "/dev/fuse is missing: the postgres-engine tests need FUSE (modprobe fuse, or pass the device into the container)" >&2
  exit 1
fi
