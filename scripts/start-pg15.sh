#!/usr/bin/env bash
# Start a stock PostgreSQL 15 (no pgvector) in DIR for trying the real[] fallback by hand:
#   scripts/start-pg15.sh start /tmp/pg15 [PORT]   -> prints the ISTREAM_DATABASE_URL to use
#   scripts/start-pg15.sh stop  /tmp/pg15
# Needs Debian's postgresql-15 (apt-get install -y postgresql-15) or PLAIN_PG_BIN=<bin dir>.
# The tests start their own server (tests/plain_postgres.py); this script is for people.
set -euo pipefail
action=${1:?usage: start-pg15.sh start|stop DIR [PORT]}
dir=$(realpath -m "${2:?usage: start-pg15.sh start|stop DIR [PORT]}")
port=${3:-54315}
bin=${PLAIN_PG_BIN:-/usr/lib/postgresql/15/bin}
as_owner=()
if [ "$(id -u)" = 0 ]; then as_owner=(runuser -u postgres --); fi
case "$action" in
start)
  [ -x "$bin/pg_ctl" ] || { echo "no PostgreSQL at $bin (apt-get install -y postgresql-15)" >&2; exit 1; }
  mkdir -p "$dir/run"
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir"; fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 >/dev/null
  fi
  "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-c listen_addresses='' -c unix_socket_directories=$dir/run -p $port" start >/dev/null
  "${as_owner[@]}" "$bin/createdb" -h "$dir/run" -p "$port" -U postgres istream 2>/dev/null || true
  echo "postgresql://postgres@/istream?host=$dir/run&port=$port"
  ;;
stop)
  "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop
  ;;
*) echo "usage: start-pg15.sh start|stop DIR [PORT]" >&2; exit 2 ;;
esac
