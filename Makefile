# Two commands: `make demo` runs the whole system, `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian's Chromium, for the storefront browser test (Playwright drives it; no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test lint bench quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cartwise demo

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/pytest

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

# The real Apache Kafka broker tests (Java 17+; Maven fetches the jars once into .cartwise/).
.PHONY: test-kafka
test-kafka: $(STAMP)
	$(BIN)/pytest tests/test_kafka_broker.py
