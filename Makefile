# fastgate — the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test build venv check lint bench clean debug

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# (re)install when the build inputs change
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard src/fastgate/_core/*.pyx src/fastgate/_core/*.pxd src/fastgate/_core/includes/*)
	$(PIP) install -q -e '.[test]'
	@touch $(STAMP)

venv build: $(STAMP)

# Starts a small demo upstream on 127.0.0.1:9001 and the gateway on config/fastgate.yaml.
run: $(STAMP)
	@$(VENV)/bin/fastgate demo-upstream --port 9001 & UP=$$!; \
	trap "kill $$UP 2>/dev/null" EXIT INT TERM; \
	$(VENV)/bin/fastgate run -c config/fastgate.yaml

test: $(STAMP)
	@bash scripts/system-deps.sh
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/fastgate check -c config/fastgate.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	bash bench/run.sh

# line tracing + annotate (.html next to each .pyx)
debug: $(PY)
	FASTGATE_DEBUG=1 $(PIP) install -q -e '.[test]'

clean:
	rm -rf build src/*.egg-info src/fastgate/_core/*.c src/fastgate/_core/*.so src/fastgate/_core/*.html
