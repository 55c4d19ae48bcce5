#!/usr/bin/env bash
# A copy cut short and resumed (issue G): one table of ROWS rows (default 20 M) with an
# integer key, copied by cutover uninterrupted (before and after, the faster counts), and
# by a pipeline killed (-9) as soon as half of its key ranges are recorded and started
# again. Prints the resumed run's time to finish (through "table copied": rows and the
# key) against the uninterrupted copy's, same servers, same run.
# Usage: bash bench/resume.sh [ROWS] [WORKERS]
set -euo pipefail
ROWS="${1:-20000000}"
WORKERS="${2:-2}"
source "$(dirname "$0")/lib.sh"
SRC=$(start_server source)
DST=$(start_server target)
psql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U cutover "$@"; }
echo "making a table of $ROWS rows on the source..."
psql -p "$SRC" -d postgres -c "CREATE TABLE big (id bigint PRIMARY KEY, a int, b text, c timestamptz);
  INSERT INTO big SELECT g, g % 1000, md5(g::text), now() FROM generate_series(1, $ROWS) g" \
  -c "VACUUM (FREEZE, ANALYZE) big" -c "CHECKPOINT"
# Frozen and checkpointed: neither copy pays for hint bits or for the load's dirty pages.
psql -p "$DST" -d postgres -c "CREATE DATABASE full_copy" -c "CREATE DATABASE resumed_copy" -c "CREATE DATABASE full_again"
SIZE=$(psql -p "$SRC" -d postgres -tAc "SELECT pg_size_pretty(pg_table_size('big'))")
RANGES=$((WORKERS * 2))

# Runs a pipeline until its table is copied; prints the seconds it took. $1 name, $2 extra env.
copy_until_done() {
  local name="$1" started
  started=$(now)
  env $2 "$CUTOVER" run --config "$WORK/$name.toml" >>"$WORK/$name.log" 2>&1 &
  echo $! > "$WORK/$name.pid"
  until grep -q "table copied" "$WORK/$name.log" 2>/dev/null; do
    kill -0 "$(cat "$WORK/$name.pid")" 2>/dev/null || { cat "$WORK/$name.log" >&2; exit 1; }
    sleep 0.05
  done
  elapsed "$started" "$(now)"
}

# Copies the table uninterrupted into database $2 with pipeline $1; prints the seconds.
full_copy() {
  pg_config "$WORK/$1.toml" "$SRC" "$DST" "$2" "$WORK/$1-state" "[snapshot]
workers = $WORKERS
"
  local took; took=$(copy_until_done "$1" "")
  kill "$(cat "$WORK/$1.pid")"; wait "$(cat "$WORK/$1.pid")" 2>/dev/null || true
  psql -p "$DST" -d postgres -c "CHECKPOINT"
  echo "$took"
}
FULL_BEFORE=$(full_copy full full_copy)

pg_config "$WORK/resumed.toml" "$SRC" "$DST" resumed_copy "$WORK/resumed-state" "[snapshot]
workers = $WORKERS
"
started=$(now)
CUTOVER_LOG=info,cutover::pipeline::snapshot=debug "$CUTOVER" run --config "$WORK/resumed.toml" >>"$WORK/resumed.log" 2>&1 &
pid=$!
until [ "$(grep -c "chunk copied" "$WORK/resumed.log" 2>/dev/null)" -ge $((RANGES / 2)) ]; do
  kill -0 "$pid" 2>/dev/null || { cat "$WORK/resumed.log" >&2; exit 1; }
  sleep 0.05
done
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
BEFORE_KILL=$(elapsed "$started" "$(now)")
RESUMED=$(copy_until_done resumed "")
kill "$(cat "$WORK/resumed.pid")"; wait "$(cat "$WORK/resumed.pid")" 2>/dev/null || true
psql -p "$DST" -d postgres -c "CHECKPOINT"
FULL_AFTER=$(full_copy again full_again)
FULL=$(printf '%s\n%s\n' "$FULL_BEFORE" "$FULL_AFTER" | sort -n | head -1)
grep -q "resuming the table's copy" "$WORK/resumed.log" || { echo "the second run did not resume" >&2; exit 1; }
for db in full_copy resumed_copy; do
  psql -p "$DST" -d "$db" -tAc "SELECT count(*), sum(hashtext(b)) FROM big" > "$WORK/$db.sum"
done
cmp -s "$WORK/full_copy.sum" "$WORK/resumed_copy.sum" || { echo "the copies differ" >&2; exit 1; }

printf '\nresumed copy of one %s-row table (%s, %s key ranges, %s workers), killed (-9) once half its ranges were recorded\n' \
  "$ROWS" "$SIZE" "$RANGES" "$WORKERS"
printf '  uninterrupted copy:          %6.1f s  (%.1f s before, %.1f s after the resumed run)\n' "$FULL" "$FULL_BEFORE" "$FULL_AFTER"
printf '  run killed after:            %6.1f s\n' "$BEFORE_KILL"
printf '  resumed run, time to finish: %6.1f s  (%.2fx the uninterrupted copy)\n' "$RESUMED" "$(echo "$RESUMED / $FULL" | bc -l)"
for name in full resumed again; do
  printf '  %-8s %s\n' "$name:" "$(grep -E "table copied|snapshot copied" "$WORK/$name.log" | sed 's/^.*INFO //' | tr '\n' ' ')"
done
