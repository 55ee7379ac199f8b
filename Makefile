# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean services

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U "pip>=25.1"

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e . --group dev --group bench
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/order_workflow.py
	$(BIN)/python examples/payments.py

test: $(STAMP) lint services
	scripts/ensure-browser
	$(BIN)/python -m pytest -n 4

# Redis and RabbitMQ reachable (started if installed and stopped); the tests start Kafka.
services:
	scripts/ensure-services

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks examples
	$(BIN)/ruff format src tests benchmarks examples

bench: $(STAMP) services
	$(BIN)/python benchmarks/native_engine.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/patterns.py
	$(BIN)/python benchmarks/sessions.py
	$(BIN)/python benchmarks/tokens.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
