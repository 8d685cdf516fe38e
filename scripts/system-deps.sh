#!/usr/bin/env bash
# System packages the test suite needs beyond pip: docker-compose (to validate
# docker-compose.yml with a real parser; no engine needed) and postgresql-15 (a stock
# PostgreSQL without pgvector: the storage tests' real[] fallback server). Installs
# with apt when missing and running as root; otherwise says what to install.
set -euo pipefail
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
[ -x "${PLAIN_PG_BIN:-/usr/lib/postgresql/15/bin}/pg_ctl" ] || need+=(postgresql-15)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages: ${need[*]} (install them with your package manager, then rerun)" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
