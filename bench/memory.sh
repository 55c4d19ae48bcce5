#!/usr/bin/env bash
# Peak memory while streaming one transaction of large values (issue F, item 10): a
# PostgreSQL and a MariaDB source each insert N rows of 1 MiB of random hex text in ONE
# transaction while cutover streams; cutover's peak RSS (VmHWM) once the target has every
# row. Goal: ≤ 300 MiB for N in the hundreds — the decode → apply channel and the batch
# are bounded by bytes, not only by counts.
# Usage: bash bench/memory.sh [rows]   (issue target: 300)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-300}"
source bench/lib.sh
MIB_OF_HEX="(SELECT string_agg(md5(random()::text || s), '') FROM generate_series(1, 32768) s)"

peak_rss_mib() { echo $(( $(awk '/VmHWM/ {print $2}' "/proc/$1/status") / 1024 )); }
wait_rows() { # psql args... -> waits until the count query prints $ROWS
  until [ "$("$@" 2>/dev/null)" = "$ROWS" ]; do sleep 0.2; done
}

# PostgreSQL → PostgreSQL.
S=$(start_server pg_source); T=$(start_server pg_target)
psql -q -h 127.0.0.1 -p "$S" -U cutover postgres -c "CREATE TABLE blobs (id int PRIMARY KEY, v text)"
pg_config "$WORK/pg.toml" "$S" "$T" postgres "$WORK/pg-state"
"$CUTOVER" run --config "$WORK/pg.toml" 2>"$WORK/pg.log" & CPID=$!
wait_streaming "$WORK/pg.log"
psql -q -h 127.0.0.1 -p "$S" -U cutover postgres \
  -c "INSERT INTO blobs SELECT g, $MIB_OF_HEX FROM generate_series(1, $ROWS) g"
wait_rows psql -tA -h 127.0.0.1 -p "$T" -U cutover postgres -c "SELECT count(*) FROM blobs WHERE length(v) = 1048576"
PG_RSS=$(peak_rss_mib $CPID)
kill -TERM $CPID; wait $CPID || true

# MariaDB → PostgreSQL.
M=$(start_mariadb mariadb); T2=$(start_server my_target)
mariadb -h 127.0.0.1 -P "$M" -u cutover -e "CREATE DATABASE shop; CREATE TABLE shop.blobs (id int PRIMARY KEY, v longtext)"
cat > "$WORK/my.toml" <<TOML
[source]
kind = "mysql"
url = "mysql://cutover@127.0.0.1:$M/shop"
[target]
kind = "postgres"
url = "$(url "$T2")"
[state]
dir = "$WORK/my-state"
TOML
"$CUTOVER" run --config "$WORK/my.toml" 2>"$WORK/my.log" & CPID=$!
wait_streaming "$WORK/my.log"
mariadb -h 127.0.0.1 -P "$M" -u cutover -e "SET SESSION group_concat_max_len = 4194304;
  INSERT INTO shop.blobs SELECT g.seq, (SELECT GROUP_CONCAT(MD5(CONCAT(RAND(), s.seq)) SEPARATOR '') FROM seq_1_to_32768 s)
  FROM seq_1_to_$ROWS g"
wait_rows psql -tA -h 127.0.0.1 -p "$T2" -U cutover postgres -c "SELECT count(*) FROM shop.blobs WHERE length(v) = 1048576"
MY_RSS=$(peak_rss_mib $CPID)
kill -TERM $CPID; wait $CPID || true

echo "one transaction of $ROWS × 1 MiB values: peak RSS PostgreSQL source $PG_RSS MiB, MariaDB source $MY_RSS MiB (goal ≤ 300 MiB)"
