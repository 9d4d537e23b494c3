# pgkeeper: every set-up step lives here (and in scripts/), so a fresh clone needs only make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-runtime
TSTAMP := $(VENV)/.installed-test

.PHONY: install install-test system-deps test test-unit lint demo bench bench-pitr bench-fleet clean

install: system-deps $(STAMP)  ## .venv with the pgkeeper command (.venv/bin/pgkeeper)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

install-test: install $(TSTAMP)

$(TSTAMP): pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

system-deps:  ## PostgreSQL client/server binaries and zstd, from the OS packages
	@scripts/system-deps.sh

test: install-test  ## everything: unit and integration tests against real servers
	$(BIN)/pytest

test-unit: install-test
	$(BIN)/pytest tests/unit

lint: install-test
	$(BIN)/ruff check src flows tasks deployments tests bench
	$(BIN)/mypy

demo: install  ## local Prefect server + sample PostgreSQL + every deployment served
	$(BIN)/python -m deployments.demo

bench: install-test  ## speed and memory against pg_dump baselines measured in the same run
	$(BIN)/python bench/bench_backup.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_upload.py $(UPLOAD_BENCH_ARGS)
	PGKEEPER_BENCH_PITR=1 scripts/system-deps.sh
	$(BIN)/python bench/bench_pitr.py $(PITR_BENCH_ARGS)
	$(BIN)/python bench/bench_fleet.py $(FLEET_BENCH_ARGS)

bench-pitr: install-test  ## WAL archiving vs cp / pgBackRest async, PITR restore vs pg_basebackup+cp
	PGKEEPER_BENCH_PITR=1 scripts/system-deps.sh
	$(BIN)/python bench/bench_pitr.py $(PITR_BENCH_ARGS)

bench-fleet: install-test  ## the fleet through Prefect vs a pg_dump | zstd loop, and its costs as it grows (~10 min on 2 cores; not part of make test)
	$(BIN)/python bench/bench_fleet.py $(FLEET_BENCH_ARGS)

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .mypy_cache .ruff_cache
