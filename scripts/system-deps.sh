#!/usr/bin/env bash
# Install the OS packages pgkeeper and its tests need, when they are missing:
# PostgreSQL client and server binaries (pg_dump, pg_restore, psql, initdb, pg_ctl), zstd, and
# age (restoring an encrypted backup by hand, and the tests that do it); with
# PGKEEPER_BENCH_PITR=1 also pgBackRest (the PITR benchmark's baseline).
set -euo pipefail

need=()
if ! command -v pg_config >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_dump >/dev/null 2>&1; then
  need+=(postgresql postgresql-client)
elif ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v age >/dev/null 2>&1 || need+=(age)
# The PITR benchmark (make bench-pitr) compares with pgBackRest's archive-push: only then.
if [ "${PGKEEPER_BENCH_PITR:-}" = 1 ]; then
  command -v pgbackrest >/dev/null 2>&1 || need+=(pgbackrest)
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing OS packages: ${need[*]} (install them with: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing OS packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's package starts a cluster of its own; the tests start throwaway ones instead.
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for conf in /etc/postgresql/*/main; do
    [ -d "$conf" ] || continue
    version=$(basename "$(dirname "$conf")")
    pg_ctlcluster "$version" main stop 2>/dev/null || true
  done
fi
