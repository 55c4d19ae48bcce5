#!/usr/bin/env bash
# SQLite → PostgreSQL one-shot copy, cutover against pgloader on the same file,
# same machine, same run, printed as a ratio (median of the rounds), with rows/s
# and a check that both targets hold the same rows.
# Usage: bash bench/sqlite.sh [rows] [rounds]   (default 1000000 rows, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
ROUNDS="${2:-3}"
source bench/lib.sh
FILE="$WORK/app.db"
# Declared types both tools map: integers, a decimal, a REAL, text, a timestamp, a blob.
sqlite3 "$FILE" <<SQL
CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(60) NOT NULL, since DATE);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER NOT NULL REFERENCES customers (id),
    amount DECIMAL(12,2), weight REAL, note TEXT, created DATETIME, receipt BLOB);
CREATE INDEX orders_by_customer ON orders (customer);
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 1000)
INSERT INTO customers SELECT n, 'customer ' || n, date('2020-01-01', '+' || n || ' days') FROM g;
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < $ROWS)
INSERT INTO orders SELECT n, 1 + n % 1000, printf('%.2f', n * 1.25), n / 7.0, 'order number ' || n,
    datetime(1700000000 + n, 'unixepoch'), randomblob(16) FROM g;
SQL
chmod a+r "$FILE"
SIZE_MB=$(( $(stat -c %s "$FILE") / 1048576 ))
T1=$(start_server pgloader); T2=$(start_server cutover)
SUMS="SELECT count(*), sum(id), sum(customer), sum(amount), sum(length(note)) FROM public.orders"

PGLOADER_TIMES=(); CUTOVER_TIMES=()
for round in $(seq "$ROUNDS"); do
  psql -q -h 127.0.0.1 -p "$T1" -U cutover postgres -c "DROP TABLE IF EXISTS public.orders, public.customers CASCADE" >/dev/null 2>&1
  sync; sleep 1
  t0=$(now)
  pgloader "sqlite://$FILE" "$(url "$T1")" > "$WORK/pgloader.log" 2>&1 || { echo "pgloader failed:"; tail -5 "$WORK/pgloader.log"; }
  t1=$(now); PGLOADER_TIMES+=("$(elapsed "$t0" "$t1")")

  psql -q -h 127.0.0.1 -p "$T2" -U cutover postgres -c "DROP TABLE IF EXISTS public.orders, public.customers CASCADE" >/dev/null 2>&1
  rm -rf "$WORK/state"
  cat > "$WORK/bench.toml" <<TOML
[source]
kind = "sqlite"
url = "sqlite://$FILE"
[target]
kind = "postgres"
url = "$(url "$T2")"
[state]
dir = "$WORK/state"
[metrics]
listen = "off"
TOML
  sync; sleep 1
  t0=$(now); "$CUTOVER" run --config "$WORK/bench.toml" 2>"$WORK/cutover.log" & CPID=$!
  RSS=0
  while kill -0 $CPID 2>/dev/null; do
    r=$(awk '/VmHWM/ {print $2}' /proc/$CPID/status 2>/dev/null || echo 0); [ "${r:-0}" -gt "$RSS" ] && RSS=$r; sleep 0.1
  done
  wait $CPID || { echo "cutover failed:"; tail -5 "$WORK/cutover.log"; exit 1; }
  t1=$(now); CUTOVER_TIMES+=("$(elapsed "$t0" "$t1")")
done

PGLOADER=$(printf '%s\n' "${PGLOADER_TIMES[@]}" | median)
CUTOVER_S=$(printf '%s\n' "${CUTOVER_TIMES[@]}" | median)
A=$(psql -tA -F ' ' -h 127.0.0.1 -p "$T1" -U cutover postgres -c "$SUMS" 2>/dev/null || echo "missing")
B=$(psql -tA -F ' ' -h 127.0.0.1 -p "$T2" -U cutover postgres -c "$SUMS")
W=$(psql -tA -h 127.0.0.1 -p "$T1" -U cutover postgres -c "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.orders'::regclass AND attname = 'weight'" 2>/dev/null || echo "?")
TOTAL=$((ROWS + 1000))
echo "SQLite file of $TOTAL rows ($SIZE_MB MiB) into PostgreSQL, median of $ROUNDS rounds:"
printf "  cutover            %6.1f s   %8.0f rows/s   peak RSS %d MiB   (rounds: %s)\n" "$CUTOVER_S" "$(echo "$TOTAL / $CUTOVER_S" | bc -l)" $((RSS / 1024)) "${CUTOVER_TIMES[*]}"
printf "  pgloader           %6.1f s   %8.0f rows/s   (rounds: %s)\n" "$PGLOADER" "$(echo "$TOTAL / $PGLOADER" | bc -l)" "${PGLOADER_TIMES[*]}"
printf "  ratio cutover/pgloader = %.2f\n" "$(echo "$CUTOVER_S / $PGLOADER" | bc -l)"
[ "$A" = "$B" ] && echo "  both targets hold the same orders (count, sums): $B" || echo "  targets differ: pgloader $A, cutover $B"
echo "  REAL column on the target: cutover double precision, pgloader $W"
