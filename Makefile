# Two commands: `make demo` runs the whole system, `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian's Chromium, for the storefront browser test (Playwright drives it; no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Apache Kafka's jars (the version deploy/kafka/pom.xml pins), fetched by Maven on first use for
# the Kafka half of the tests; without Java 17+ and Maven that half is skipped.
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_JARS := .cartwise/kafka-$(KAFKA_VERSION)/libs/.complete
# Which broker(s) the stream suites run on: both, tansu or kafka (`make test BROKER=tansu`).
BROKER ?= both

.PHONY: install demo test lint bench quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

$(KAFKA_JARS): deploy/kafka/pom.xml | $(STAMP)
	$(BIN)/python -m cartwise.kafka_broker --fetch

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cartwise demo

# The stream suites run on Tansu and on Apache Kafka (tests/conftest.py, --broker).
test: $(STAMP) $(CHROMIUM) $(KAFKA_JARS)
	$(BIN)/ruff check .
	$(BIN)/pytest --broker $(BROKER)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.api_latency

# The full prequential replay of the shared logs (docs/quality-protocol.md); writes docs/quality.md.
quality: $(STAMP)
	$(BIN)/python -m bench.repurchase
	$(BIN)/python -m bench.ladder
	$(BIN)/python -m bench.quality

clean:
	rm -rf $(VENV) .cartwise .pytest_cache .ruff_cache

# The Apache Kafka half only: the broker's own tests and the stream suites on it.
.PHONY: test-kafka
test-kafka: $(STAMP) $(KAFKA_JARS)
	$(BIN)/pytest --broker kafka tests/test_kafka_broker.py tests/test_pipeline.py \
		tests/test_recovery_and_scale.py tests/test_faults.py tests/test_operations.py
