#!/usr/bin/env bash
# MySQL / MariaDB → PostgreSQL benchmarks, same machine, same run, printed as ratios:
# 1. snapshot of sysbench data (4 tables × 250 k rows): cutover against pgloader;
# 2. a sysbench oltp_write_only backlog (4 threads) written while cutover is stopped,
#    then applied: catch-up time against the time it took to write;
# 3. live lag: cutover streaming while sysbench oltp_write_only (4 threads) writes,
#    cutover_lag_seconds sampled every 100 ms: p99 and max;
# 4. peak RSS of cutover throughout.
# Usage: [APPLY_CONNECTIONS=n] bash bench/mysql.sh [rows per table] [backlog seconds]   (issue targets: 250000, 30)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-250000}"
BACKLOG_SECONDS="${2:-30}"
source bench/lib.sh
SRC=$(start_mariadb mariadb)
SYSBENCH=(sysbench --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$SRC" --mysql-user=cutover --mysql-db=sbtest
          --tables=4 --table-size="$ROWS")
mariadb -h 127.0.0.1 -P "$SRC" -u cutover -e "CREATE DATABASE sbtest"
"${SYSBENCH[@]}" oltp_read_write prepare >/dev/null
mariadb -h 127.0.0.1 -P "$SRC" -u cutover -e "CREATE TABLE sbtest.bench_marker (id int PRIMARY KEY, note varchar(20)); INSERT INTO sbtest.bench_marker VALUES (1, 'start')"
T1=$(start_server pgloader); T2=$(start_server cutover)
MPORT=$(free_port)

sync; sleep 1
PGLOADER=""
for attempt in 1 2 3; do
  psql -q -h 127.0.0.1 -p "$T1" -U cutover postgres -c "DROP SCHEMA IF EXISTS sbtest CASCADE" >/dev/null 2>&1
  t0=$(now)
  if pgloader "mysql://cutover@127.0.0.1:$SRC/sbtest" "$(url "$T1")" > "$WORK/pgloader.log" 2>&1; then
    t1=$(now); PGLOADER=$(elapsed "$t0" "$t1"); break
  fi
  echo "pgloader failed (attempt $attempt):"; grep -iE "error|fatal|exhausted" "$WORK/pgloader.log" | head -3
done
PGLOADER_ROWS=$(psql -tA -h 127.0.0.1 -p "$T1" -U cutover postgres -c "SELECT count(*) FROM sbtest.sbtest1" 2>/dev/null || echo "?")

cat > "$WORK/bench.toml" <<TOML
[source]
kind = "mysql"
url = "mysql://cutover@127.0.0.1:$SRC/sbtest"
[target]
kind = "postgres"
url = "$(url "$T2")"
[state]
dir = "$WORK/state"
[snapshot]
workers = 2
[metrics]
listen = "127.0.0.1:$MPORT"
${APPLY_CONNECTIONS:+[pipeline]
apply_connections = $APPLY_CONNECTIONS}
TOML
wait_marker() { until [ "$(psql -tA -h 127.0.0.1 -p "$T2" -U cutover postgres -c "SELECT note FROM sbtest.bench_marker WHERE id = 1" 2>/dev/null)" = "$1" ]; do sleep 0.05; done; }
set_marker() { mariadb -h 127.0.0.1 -P "$SRC" -u cutover -e "UPDATE sbtest.bench_marker SET note = '$1' WHERE id = 1"; }

sync; sleep 1
t0=$(now); "$CUTOVER" run --config "$WORK/bench.toml" 2>"$WORK/cutover.log" & CPID=$!
wait_streaming "$WORK/cutover.log"; t1=$(now)
SNAPSHOT=$(elapsed "$t0" "$t1")
RSS_SNAPSHOT=$(( $(awk '/VmHWM/ {print $2}' /proc/$CPID/status) / 1024 ))
kill -TERM $CPID; wait $CPID || true

t0=$(now); "${SYSBENCH[@]}" --threads=4 --time="$BACKLOG_SECONDS" oltp_write_only run > "$WORK/sysbench.out"; t1=$(now)
WRITE=$(elapsed "$t0" "$t1")
set_marker backlog
TX=$(awk '/transactions:/ {print $2}' "$WORK/sysbench.out")
S0=$(mariadb_cpu mariadb); T0=$(server_cpu cutover)
t0=$(now); "$CUTOVER" run --config "$WORK/bench.toml" 2>>"$WORK/cutover.log" & CPID=$!
wait_marker backlog; t1=$(now)
CATCHUP=$(elapsed "$t0" "$t1")
CATCHUP_CPU="source $(echo "$(mariadb_cpu mariadb) - $S0" | bc) s, target $(echo "$(server_cpu cutover) - $T0" | bc) s, cutover $(cpu_of $CPID) s"

# Live: cutover keeps streaming while sysbench writes; sample the lag metric (after a
# pause, so the catch-up's last lag has given way to the idle pipeline's 0).
sleep 2
: > "$WORK/lag"
"${SYSBENCH[@]}" --threads=4 --time="$BACKLOG_SECONDS" oltp_write_only run > "$WORK/sysbench-live.out" & SPID=$!
while kill -0 $SPID 2>/dev/null; do
  curl -s "http://127.0.0.1:$MPORT/metrics" | awk '/^cutover_lag_seconds / {print $2}' >> "$WORK/lag"
  sleep 0.1
done
LIVE_TX=$(awk '/transactions:/ {print $2}' "$WORK/sysbench-live.out")
P99=$(sort -g "$WORK/lag" | awk '{v[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; print v[i]}')
LAG_MAX=$(sort -g "$WORK/lag" | tail -1)
SAMPLES=$(wc -l < "$WORK/lag")
set_marker live; wait_marker live
RSS_STREAM=$(( $(awk '/VmHWM/ {print $2}' /proc/$CPID/status) / 1024 ))
kill -TERM $CPID; wait $CPID || true
# The applied backlog, checked: per table, row count and sums of id and k on both sides.
SUMS="SELECT COUNT(*), SUM(id), SUM(k) FROM"
CHECK=ok
for t in 1 2 3 4; do
  src=$(mariadb -N -h 127.0.0.1 -P "$SRC" -u cutover -e "$SUMS sbtest.sbtest$t" | tr '\t' ' ')
  dst=$(psql -tA -F ' ' -h 127.0.0.1 -p "$T2" -U cutover postgres -c "$SUMS sbtest.sbtest$t")
  [ "$src" = "$dst" ] || CHECK="DIFFER on sbtest$t: source $src, target $dst"
done

echo "sysbench snapshot (4 tables × $ROWS rows) into PostgreSQL, seconds:"
printf "  cutover            %6.1f s   peak RSS %d MiB\n" "$SNAPSHOT" "$RSS_SNAPSHOT"
if [ -n "$PGLOADER" ]; then
  printf "  pgloader           %6.1f s   (%s rows in sbtest1)   ratio cutover/pgloader = %.2f\n" "$PGLOADER" "$PGLOADER_ROWS" "$(echo "$SNAPSHOT / $PGLOADER" | bc -l)"
else
  echo "  pgloader           failed three times (see above)"
fi
echo "sysbench oltp_write_only backlog, 4 threads, $TX transactions:"
printf "  written in         %6.1f s\n" "$WRITE"
printf "  applied in         %6.1f s   ratio apply/write = %.2f   peak RSS %d MiB   apply_connections %s\n" "$CATCHUP" "$(echo "$CATCHUP / $WRITE" | bc -l)" "$RSS_STREAM" "${APPLY_CONNECTIONS:-default}"
echo "  CPU while applying: $CATCHUP_CPU"
echo "  target after catch-up and live load (count, sum(id), sum(k) per table): $CHECK"
echo "live: sysbench oltp_write_only, 4 threads, ${BACKLOG_SECONDS}s, $LIVE_TX transactions while cutover streams:"
printf "  cutover_lag_seconds p99 %.2f s, max %.2f s (%d samples every 100 ms)\n" "$P99" "$LAG_MAX" "$SAMPLES"
