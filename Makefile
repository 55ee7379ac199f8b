# Two commands on a fresh machine: `make demo` and `make test`.
# What they install is pinned by uv.lock (Python 3.11 and 3.12); `make upgrade` refreshes it.
PY ?= python3
UV_VERSION := 0.13.10
VENV ?= .venv
BIN := $(VENV)/bin
# Named after the interpreter, so a new PY rebuilds the venv instead of reusing the old one.
STAMP := $(VENV)/.installed-$(notdir $(PY))
# uv itself, pinned, in a venv of its own, so nothing outside the checkout is touched.
UV := .uv/bin/uv
# Resolve against the interpreter PY names; never download one behind the user's back.
export UV_PYTHON_DOWNLOADS := never
# In the order examples/README.md tells them.
EXAMPLES := order_fanout payment_pipeline ride_matching video_pipeline judge_queue chess sessions

.PHONY: demo test test-latest test-pika-oldest upgrade lint format bench compare clean services kafka

$(UV):
	$(PY) -m venv .uv
	.uv/bin/python -m pip install -q "uv==$(UV_VERSION)"

$(STAMP): $(UV) pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync -q --locked --all-groups --python $(PY)
	touch $(STAMP)

# Every example on the embedded engine, at the small sizes (python -m examples.<name> for more).
demo: $(STAMP)
	@for example in $(EXAMPLES); do \
		echo "== python -m examples.$$example --quick"; \
		$(BIN)/python -m examples.$$example --quick || exit 1; \
	done

test: $(STAMP) lint services
	scripts/ensure-browser
	$(BIN)/python -m polybus.testing.apache_kafka fetch
	$(BIN)/python -m pytest -n 4

# The suite against the newest releases the library's ranges allow, in .venv-latest,
# so an upstream release that breaks us is seen on purpose; the lock is left alone.
test-latest: $(UV)
	$(UV) venv -q --allow-existing --python $(PY) .venv-latest
	$(UV) pip install -q --python .venv-latest/bin/python --upgrade -e . --group dev --group bench
	touch .venv-latest/.installed-$(notdir $(PY))
	$(MAKE) test VENV=.venv-latest
	$(MAKE) test-pika-oldest

# The RabbitMQ tests against the oldest pika the range allows: the adapter leans on pika
# internals (adapters/rabbitmq/pika_hooks.py), so both ends of the range are tried.
PIKA_OLDEST := 1.3.0
test-pika-oldest: $(UV) services
	$(UV) venv -q --allow-existing --python $(PY) .venv-pika-oldest
	UV_PROJECT_ENVIRONMENT=.venv-pika-oldest $(UV) sync -q --locked --all-groups --python $(PY)
	$(UV) pip install -q --python .venv-pika-oldest/bin/python "pika==$(PIKA_OLDEST)"
	.venv-pika-oldest/bin/python -m pytest -n 4 -p no:randomly tests/test_rabbitmq.py \
		tests/test_conformance.py tests/test_patterns.py tests/test_sessions_store.py -k rabbitmq

# Move uv.lock to the newest releases within pyproject.toml's ranges; commit it after `make test`.
upgrade: $(UV)
	$(UV) lock --upgrade

# Redis, RabbitMQ and PostgreSQL reachable: installed (Debian, as root) and started when missing.
services:
	scripts/ensure-services

# Apache Kafka on 127.0.0.1:9092 in the foreground until Ctrl-C (the tests start their own).
kafka: $(STAMP)
	$(BIN)/python -m polybus.testing.apache_kafka run 9092

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks examples
	$(BIN)/ruff format src tests benchmarks examples

bench: $(STAMP) services
	$(BIN)/python -m polybus.testing.apache_kafka fetch
	$(BIN)/python benchmarks/native_engine.py
	$(BIN)/python benchmarks/native_facade.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/patterns.py
	$(BIN)/python benchmarks/observability.py
	$(BIN)/python benchmarks/sessions.py
	$(BIN)/python benchmarks/tokens.py
	$(BIN)/python benchmarks/peers.py

# The same workloads and every example on each backend: one table, a chart and JSON.
compare: $(STAMP) services
	$(BIN)/python -m polybus.testing.apache_kafka fetch
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf .uv $(VENV) .venv-latest .venv-pika-oldest build .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
