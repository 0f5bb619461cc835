# gridpay: every target creates .venv and installs the project when needed; safe to run again.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo run test lint fault bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip >/dev/null
	@$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m switch.demo

run: $(STAMP)
	$(BIN)/gridpay up

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory lint

lint: $(STAMP)
	$(BIN)/ruff check switch protocols crypto hsm_sim marketing_sim bench tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench all

fault: $(STAMP)
	$(BIN)/python -m bench.faults --doc docs/reliability.md

clean:
	rm -rf $(VENV) build *.egg-info .gridpay
