#!/usr/bin/env bash
# Benchmarks, same machine, same run, printed as ratios:
# 1. snapshot of pgbench data: cutover against `pg_dump | psql` and `pgcopydb clone`;
# 2. catch-up of a pgbench backlog: cutover (apply_connections in LANES, default "1 2 4") against
#    PostgreSQL's own subscription, with each process's CPU seconds;
# 3. peak RSS of cutover: during the snapshot and while applying one 2 M-row transaction.
# Usage: bash bench/run.sh [snapshot scale] [backlog seconds]   (issue targets: 30, 30)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${1:-30}"
BACKLOG_SECONDS="${2:-30}"
source bench/lib.sh
SRC=$(start_server source)
"$BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$SRC" -U cutover postgres >/dev/null 2>&1
psql -q -h 127.0.0.1 -p "$SRC" -U cutover postgres -c "CHECKPOINT" >/dev/null
ROUNDS="${ROUNDS:-3}"
T1=$(start_server dump); T2=$(start_server copydb); T3=$(start_server cutover)
# A fresh database, and the previous run's dirty pages written out first, so no run
# pays for another's disk writeback.
newdb() { psql -q -h 127.0.0.1 -p "$1" -U cutover postgres -c "CREATE DATABASE $2" >/dev/null; sync; sleep 1; }
# The tools take turns, each into a fresh database, ROUNDS times; the median counts.
: > "$WORK/dump.times"; : > "$WORK/copydb.times"; : > "$WORK/cutover.times"; : > "$WORK/rss"
for round in $(seq "$ROUNDS"); do
  db="r$round"
  # Peer 1: pg_dump | psql
  newdb "$T1" "$db"
  t0=$(now); "$BIN/pg_dump" -h 127.0.0.1 -p "$SRC" -U cutover postgres | psql -q -h 127.0.0.1 -p "$T1" -U cutover "$db" >/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >> "$WORK/dump.times"
  # Peer 2: pgcopydb clone
  if command -v pgcopydb >/dev/null; then
    newdb "$T2" "$db"
    t0=$(now)
    if pgcopydb clone --source "$(url "$SRC")" --target "$(url "$T2" "$db")" \
        --table-jobs 2 --index-jobs 2 --dir "$WORK/pgcopydb-$round" >"$WORK/pgcopydb.log" 2>&1; then
      t1=$(now); echo "$t1 - $t0" | bc >> "$WORK/copydb.times"
    fi
  fi
  # cutover: snapshot mode = "only"; peak RSS from /usr/bin/time
  newdb "$T3" "$db"
  pg_config "$WORK/bench.toml" "$SRC" "$T3" "$db" "$WORK/state-$round" $'[snapshot]\nmode = "only"\nworkers = 2\n'
  t0=$(now); /usr/bin/time -a -f "%M" -o "$WORK/rss" "$CUTOVER" run --config "$WORK/bench.toml" 2>"$WORK/cutover.log"; t1=$(now)
  echo "$t1 - $t0" | bc >> "$WORK/cutover.times"
done
DUMP=$(median < "$WORK/dump.times")
PGCOPYDB=$( [ -s "$WORK/copydb.times" ] && median < "$WORK/copydb.times" || true)
CUT=$(median < "$WORK/cutover.times")
RSS_MB=$(( $(sort -n "$WORK/rss" | tail -1) / 1024 ))
ROWS=$(psql -tA -h 127.0.0.1 -p "$T3" -U cutover r1 -c "SELECT count(*) FROM pgbench_accounts")

# 2. Catch-up: a second source (scale 10), cutover pipelines (one per apply_connections
# in LANES, each into its own target database) and a native subscription all in sync, all
# stopped, a pgbench backlog written, then each catches up in turn; "caught up" is a
# marker row written after the backlog becoming visible on the target.
LANES="${LANES:-1 2 4}"
SRC2=$(start_server source2)
"$BIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$SRC2" -U cutover postgres >/dev/null 2>&1
psql -q -h 127.0.0.1 -p "$SRC2" -U cutover postgres -c "CREATE TABLE bench_marker (id int PRIMARY KEY, note text); INSERT INTO bench_marker VALUES (1, 'start'); CREATE TABLE bench_big (id int PRIMARY KEY, payload text);" >/dev/null
CT=$(start_server catchup_cutover)
NT=$(start_server catchup_native)
wait_marker() { # port note [database]
  until [ "$(psql -tA -h 127.0.0.1 -p "$1" -U cutover "${3:-postgres}" -c "SELECT note FROM bench_marker WHERE id = 1" 2>/dev/null)" = "$2" ]; do sleep 0.05; done
}
set_marker() { psql -q -h 127.0.0.1 -p "$SRC2" -U cutover postgres -c "UPDATE bench_marker SET note = '$1' WHERE id = 1" >/dev/null; }
for n in $LANES; do
  psql -q -h 127.0.0.1 -p "$CT" -U cutover postgres -c "CREATE DATABASE c$n" >/dev/null
  pg_config "$WORK/catchup$n.toml" "$SRC2" "$CT" "c$n" "$WORK/state-catchup$n" "$(printf '[pipeline]\napply_connections = %s\n' "$n")"
  "$CUTOVER" run --config "$WORK/catchup$n.toml" 2>>"$WORK/catchup$n.log" & CPID=$!
  wait_streaming "$WORK/catchup$n.log"
  set_marker "synced$n"; wait_marker "$CT" "synced$n" "c$n"
  kill -TERM $CPID; wait $CPID || true
done
"$BIN/pg_dump" -s -h 127.0.0.1 -p "$SRC2" -U cutover postgres | psql -q -h 127.0.0.1 -p "$NT" -U cutover postgres >/dev/null
psql -q -h 127.0.0.1 -p "$SRC2" -U cutover postgres -c "CREATE PUBLICATION bench_native FOR TABLES IN SCHEMA public" >/dev/null
psql -q -h 127.0.0.1 -p "$NT" -U cutover postgres -c "CREATE SUBSCRIPTION bench_native CONNECTION '$(url "$SRC2")' PUBLICATION bench_native" >/dev/null
set_marker synced; wait_marker "$NT" synced
psql -q -h 127.0.0.1 -p "$NT" -U cutover postgres -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null
sleep 1
# PGBENCH_ARGS="-N" writes pgbench's simple-update mix (no hot branch and teller rows).
"$BIN/pgbench" -n ${PGBENCH_ARGS:-} -c 4 -j 2 -T "$BACKLOG_SECONDS" -h 127.0.0.1 -p "$SRC2" -U cutover postgres > "$WORK/pgbench.out" 2>&1 \
  || { echo "pgbench failed:" >&2; cat "$WORK/pgbench.out" >&2; exit 1; }
set_marker backlog
BACKLOG_TX=$(grep -E "number of transactions actually processed" "$WORK/pgbench.out" | awk '{print $NF}' | cut -d/ -f1)
S0=$(server_cpu source2); T0=$(server_cpu catchup_native)
t0=$(now); psql -q -h 127.0.0.1 -p "$NT" -U cutover postgres -c "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null
wait_marker "$NT" backlog; t1=$(now); NATIVE_CATCHUP=$(echo "$t1 - $t0" | bc)
NATIVE_CPU="source $(echo "$(server_cpu source2) - $S0" | bc) s, target $(echo "$(server_cpu catchup_native) - $T0" | bc) s"
psql -q -h 127.0.0.1 -p "$NT" -U cutover postgres -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null
: > "$WORK/catchup.lines"
for n in $LANES; do
  S0=$(server_cpu source2); T0=$(server_cpu catchup_cutover)
  t0=$(now); "$CUTOVER" run --config "$WORK/catchup$n.toml" 2>>"$WORK/catchup$n.log" & CPID=$!
  wait_marker "$CT" backlog "c$n"; t1=$(now); took=$(echo "$t1 - $t0" | bc)
  cpu="source $(echo "$(server_cpu source2) - $S0" | bc) s, target $(echo "$(server_cpu catchup_cutover) - $T0" | bc) s, cutover $(cpu_of $CPID) s"
  printf "  cutover, apply_connections = %s  %5.1f s   ratio cutover/native = %.2f   CPU: %s\n" \
    "$n" "$took" "$(echo "$took / $NATIVE_CATCHUP" | bc -l)" "$cpu" >> "$WORK/catchup.lines"
  # The first keeps running for the large transaction below.
  if [ "$n" != "${LANES%% *}" ]; then kill -TERM $CPID; wait $CPID || true; else FIRST=$CPID; FIRST_DB="c$n"; fi
done
CPID=$FIRST

# 3. One 2 M-row transaction through the running cutover; VmHWM is its peak RSS so far.
psql -q -h 127.0.0.1 -p "$SRC2" -U cutover postgres -c "BEGIN; INSERT INTO bench_big SELECT g, md5(g::text) FROM generate_series(1, 2000000) g; UPDATE bench_marker SET note = 'big' WHERE id = 1; COMMIT" >/dev/null
t0=$(now); wait_marker "$CT" big "$FIRST_DB"; t1=$(now); BIG_SECONDS=$(echo "$t1 - $t0" | bc)
STREAM_RSS_MB=$(( $(awk '/VmHWM/ {print $2}' /proc/$CPID/status) / 1024 ))
kill -TERM $CPID; wait $CPID || true
psql -q -h 127.0.0.1 -p "$NT" -U cutover postgres -c "ALTER SUBSCRIPTION bench_native SET (slot_name = NONE); DROP SUBSCRIPTION bench_native" >/dev/null

echo "pgbench scale $SCALE snapshot ($ROWS account rows, with indexes), median of $ROUNDS rounds, seconds:"
printf "  cutover            %6.1f s   peak RSS %d MiB\n" "$CUT" "$RSS_MB"
printf "  pg_dump | psql     %6.1f s   ratio cutover/pg_dump = %.2f\n" "$DUMP" "$(echo "$CUT / $DUMP" | bc -l)"
if [ -n "$PGCOPYDB" ]; then
  printf "  pgcopydb clone     %6.1f s   ratio cutover/pgcopydb = %.2f\n" "$PGCOPYDB" "$(echo "$CUT / $PGCOPYDB" | bc -l)"
else
  echo "  pgcopydb clone     (not run: pgcopydb missing or failed)"
fi
echo "catch-up of a ${BACKLOG_SECONDS}s pgbench ${PGBENCH_ARGS:-} backlog (scale 10, 4 clients, $BACKLOG_TX transactions), seconds:"
printf "  native subscription            %5.1f s   CPU: %s\n" "$NATIVE_CATCHUP" "$NATIVE_CPU"
cat "$WORK/catchup.lines"
printf "one 2 M-row transaction applied in %.1f s; cutover peak RSS while streaming: %d MiB\n" "$BIG_SECONDS" "$STREAM_RSS_MB"
