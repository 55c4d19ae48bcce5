# Shared by the benchmark scripts: a release build, throwaway servers on free
# loopback ports (removed on exit), timing helpers. Source it; it sets WORK, CUTOVER, BIN.
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
# Off so one tool's freshly loaded tables are not vacuumed during the next tool's run.
autovacuum = off
CONF
  as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
  echo "$port"
}
start_mariadb() { # name -> prints port; user cutover with every privilege, no password
  local dir="$WORK/$1" port; port=$(free_port)
  mkdir -p "$dir"
  mariadb-install-db --no-defaults --datadir="$dir/data" --auth-root-authentication-method=socket --skip-test-db --user=root >/dev/null 2>&1
  mariadbd --no-defaults --user=root --datadir="$dir/data" --socket="$dir/sock" --port="$port" --bind-address=127.0.0.1 \
    --pid-file="$dir/pid" --log-error="$dir/err.log" --log-bin="$dir/data/binlog" --binlog-format=ROW --server-id=1 \
    --innodb-buffer-pool-size=512M --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 --character-set-server=utf8mb4 \
    >/dev/null 2>&1 &
  until mariadb --socket="$dir/sock" -u root -e "CREATE USER IF NOT EXISTS 'cutover'@'%'; GRANT ALL ON *.* TO 'cutover'@'%'" 2>/dev/null; do sleep 0.2; done
  echo "$port"
}
stop_all() {
  for d in "$WORK"/*/data; do as_pg "$BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
  for p in "$WORK"/*/pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 1; rm -rf "$WORK"
}
trap stop_all EXIT
url() { echo "postgresql://cutover@127.0.0.1:$1/${2:-postgres}"; }
# A PostgreSQL → PostgreSQL pipeline config: pg_config FILE SOURCE_PORT TARGET_PORT TARGET_DB STATE_DIR [more TOML]
pg_config() {
  printf '[source]\nkind = "postgres"\nurl = "%s"\n[target]\nkind = "postgres"\nurl = "%s"\n[state]\ndir = "%s"\n%s' \
    "$(url "$2")" "$(url "$3" "$4")" "$5" "${6:-}" > "$1"
}
# CPU seconds used so far by processes, to say which one bounds a run on these 2 cores:
# cpu_of PID…; server_cpu NAME: a PostgreSQL server's processes (its postmaster's
# children); mariadb_cpu NAME: a MariaDB server's.
cpu_of() { for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null; done | awk -v hz="$(getconf CLK_TCK)" '{s += $14 + $15} END {printf "%.2f", s / hz}'; }
server_cpu() { cpu_of $(ps --ppid "$(head -1 "$WORK/$1/data/postmaster.pid")" -o pid=); }
mariadb_cpu() { cpu_of "$(cat "$WORK/$1/pid")"; }
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
# Waits until cutover logged that it streams: its snapshot is complete, so what arrives
# from now on comes through the change stream, not through a copy.
wait_streaming() { until grep -q "streaming changes" "$1" 2>/dev/null; do sleep 0.05; done; }
now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }
