# Two entry points (see README): `make run` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build pinned here is the one this project's machines have on disk; on your
# own machine override it, e.g. `make run TORCH=torch` for the newest release.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,examples]"
	touch $@

run: install
	$(BIN)/python -m examples.demo --config examples/esperd.toml

test: install
	$(BIN)/python -m pytest -q

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) state .pytest_cache .hypothesis
