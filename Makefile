# cutover — make demo (end to end on throwaway servers), make test (all tests).
export CARGO_TARGET_DIR ?= /var/tmp/cutover-target
PACKAGES := postgresql postgresql-contrib mariadb-server libclang-dev sqlite3 pgcopydb bc time

.PHONY: deps demo test bench

# Installs the servers and build tools a bare Debian machine lacks.
deps:
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
	cargo test --no-fail-fast -- --test-threads=2

bench: deps
	bash bench/run.sh
