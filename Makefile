# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test unit integration lint bench peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The editable install puts the checkout on sys.path (package-dir in
	# pyproject.toml), so twistd finds twisted/plugins/cargobay_plugin.py
	# from any directory.
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## Start the proxy: on $$CONFIG_PATH when set (a missing file is an error,
## never the development config), else on config.toml when there is one,
## otherwise on the embedded development config.
run: $(STAMP)
	@if [ -n "$${CONFIG_PATH}" ] || [ -f config.toml ]; then \
	    exec $(BIN)/twistd -n --pidfile= cargobay; \
	else \
	    echo "no config.toml: starting on the embedded development config"; \
	    exec $(BIN)/twistd -n --pidfile= cargobay --dev; \
	fi

peers:
	sh scripts/install-peers.sh

## Everything: unit tests and the integration tests against real peers.
test: $(STAMP) peers
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check cargobay tests
	$(BIN)/mypy cargobay

bench: $(STAMP) peers
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) cargobay.egg-info
