#!/usr/bin/env bash
# Snapshot benchmark, same machine, same run: cutover against `pg_dump | psql` and
# `pgcopydb clone` on pgbench data, plus cutover's peak RSS. Prints ratios.
# Usage: bash bench/run.sh [scale]   (issue target: scale 30)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${1:-30}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cutover-target}"
cargo build --release --quiet
CUTOVER="$CARGO_TARGET_DIR/release/cutover"
BIN="${CUTOVER_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}"
WORK="$(mktemp -d /tmp/cutover-bench.XXXXXX)"
chown postgres:postgres "$WORK" 2>/dev/null || true
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_server() { # name -> prints port
  local dir="$WORK/$1" port; port=$(free_port)
  as_pg mkdir -p "$dir"
  as_pg "$BIN/initdb" -D "$dir/data" -U cutover --auth=trust -E UTF8 --no-locale --no-sync >/dev/null
  cat <<CONF | as_pg tee -a "$dir/data/postgresql.auto.conf" >/dev/null
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
fsync = off
full_page_writes = off
shared_buffers = '256MB'
max_wal_size = '4GB'
maintenance_work_mem = '1GB'
CONF
  as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
  echo "$port"
}
stop_all() { for d in "$WORK"/*/data; do as_pg "$BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; done; rm -rf "$WORK"; }
trap stop_all EXIT
now() { date +%s.%N; }
SRC=$(start_server source)
"$BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$SRC" -U cutover postgres >/dev/null 2>&1
psql -q -h 127.0.0.1 -p "$SRC" -U cutover postgres -c "CHECKPOINT" >/dev/null
url() { echo "postgresql://cutover@127.0.0.1:$1/postgres"; }

# Peer 1: pg_dump | psql
T1=$(start_server dump)
t0=$(now); "$BIN/pg_dump" -h 127.0.0.1 -p "$SRC" -U cutover postgres | psql -q -h 127.0.0.1 -p "$T1" -U cutover postgres >/dev/null; t1=$(now)
DUMP=$(echo "$t1 - $t0" | bc)

# Peer 2: pgcopydb clone
PGCOPYDB=""
if command -v pgcopydb >/dev/null; then
  T2=$(start_server copydb)
  t0=$(now)
  PGCOPYDB_DIR="$WORK/pgcopydb" pgcopydb clone --source "$(url "$SRC")" --target "$(url "$T2")" \
    --table-jobs 2 --index-jobs 2 --dir "$WORK/pgcopydb" >/dev/null 2>&1 && t1=$(now) && PGCOPYDB=$(echo "$t1 - $t0" | bc)
fi

# cutover: snapshot mode = "only", peak RSS from /usr/bin/time
T3=$(start_server cutover)
cat > "$WORK/bench.toml" <<TOML
[source]
kind = "postgres"
url = "$(url "$SRC")"
[target]
kind = "postgres"
url = "$(url "$T3")"
[state]
dir = "$WORK/state"
[snapshot]
mode = "only"
workers = 2
TOML
t0=$(now); /usr/bin/time -f "%M" -o "$WORK/rss" "$CUTOVER" run --config "$WORK/bench.toml" 2>"$WORK/cutover.log"; t1=$(now)
CUT=$(echo "$t1 - $t0" | bc)
RSS_MB=$(( $(cat "$WORK/rss") / 1024 ))
ROWS=$(psql -tA -h 127.0.0.1 -p "$T3" -U cutover postgres -c "SELECT count(*) FROM pgbench_accounts")

echo "pgbench scale $SCALE snapshot ($ROWS account rows, with indexes), seconds:"
printf "  cutover            %6.1f s   peak RSS %d MiB\n" "$CUT" "$RSS_MB"
printf "  pg_dump | psql     %6.1f s   ratio cutover/pg_dump = %.2f\n" "$DUMP" "$(echo "$CUT / $DUMP" | bc -l)"
if [ -n "$PGCOPYDB" ]; then
  printf "  pgcopydb clone     %6.1f s   ratio cutover/pgcopydb = %.2f\n" "$PGCOPYDB" "$(echo "$CUT / $PGCOPYDB" | bc -l)"
else
  echo "  pgcopydb clone     (not run: pgcopydb missing or failed)"
fi
