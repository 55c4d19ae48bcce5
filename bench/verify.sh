#!/usr/bin/env bash
# verify against the copy it checks: pgbench data copied with `pg_dump | psql`, then
# `cutover verify` of source against that copy (row counts and chunked checksums on
# both servers), both timed in the same run; the issue's goal is a ratio ≤ 1.0.
# Usage: bash bench/verify.sh [scale] [rounds]   (issue target: 30)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${1:-30}"
ROUNDS="${2:-3}"
source bench/lib.sh
SRC=$(start_server source)
TGT=$(start_server target)
"$BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$SRC" -U cutover postgres >/dev/null 2>&1
psql -q -h 127.0.0.1 -p "$SRC" -U cutover postgres -c "CHECKPOINT" >/dev/null
: > "$WORK/dump.times"; : > "$WORK/verify.times"
for round in $(seq "$ROUNDS"); do
  db="r$round"
  psql -q -h 127.0.0.1 -p "$TGT" -U cutover postgres -c "CREATE DATABASE $db" >/dev/null; sync; sleep 1
  t0=$(now); "$BIN/pg_dump" -h 127.0.0.1 -p "$SRC" -U cutover postgres | psql -q -h 127.0.0.1 -p "$TGT" -U cutover "$db" >/dev/null; t1=$(now)
  elapsed "$t0" "$t1" >> "$WORK/dump.times"
  psql -q -h 127.0.0.1 -p "$TGT" -U cutover "$db" -c "CHECKPOINT" >/dev/null; sync; sleep 1
  pg_config "$WORK/verify.toml" "$SRC" "$TGT" "$db" "$WORK/state" $'[metrics]\nlisten = "off"\n'
  t0=$(now); "$CUTOVER" verify --config "$WORK/verify.toml" > "$WORK/verify.out"; t1=$(now)
  elapsed "$t0" "$t1" >> "$WORK/verify.times"
done
cat "$WORK/verify.out"
DUMP=$(median < "$WORK/dump.times")
VERIFY=$(median < "$WORK/verify.times")
ROWS=$(psql -tA -h 127.0.0.1 -p "$SRC" -U cutover postgres -c "SELECT count(*) FROM pgbench_accounts")
echo
echo "pgbench scale $SCALE ($ROWS accounts), median of $ROUNDS:"
printf "  pg_dump | psql   %6.1f s\n" "$DUMP"
printf "  cutover verify   %6.1f s   ratio %.2f (goal ≤ 1.0)\n" "$VERIFY" "$(echo "$VERIFY / $DUMP" | bc -l)"
