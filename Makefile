# Two commands on a fresh machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest pytest-tansu pytest-slow docs install services schemas bench clean

$(STAMP): pyproject.toml scripts/install-services
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev,plots]'
	scripts/install-services $(BIN)/python
	touch $(STAMP)

install: $(STAMP)

# Apache Kafka's jars, PostgreSQL's server and kcat, where missing (make install runs it once).
services: $(STAMP)
	scripts/install-services $(BIN)/python

run: $(STAMP)
	$(BIN)/algo up --demo

test: $(STAMP) lint typecheck docs pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite on Apache Kafka (Tansu where no JDK is present: the summary says which).
pytest: $(STAMP)
	$(BIN)/pytest

# The `slow` tests (crash matrix seeds, a replayed day, the whole stack up), and the slow ones of the `tansu` subset
# on Tansu: CI runs them after `make test`.
pytest-slow: $(STAMP)
	$(BIN)/pytest -m slow
	TEST_KAFKA=tansu $(BIN)/pytest -m 'slow and tansu'

# The `tansu` marked subset again on the Tansu broker, the fallback of machines without a JDK: CI runs it after
# `make test`, which keeps to the broker production runs and to its 15-minute budget.
pytest-tansu: $(STAMP)
	TEST_KAFKA=tansu $(BIN)/pytest -m 'tansu and not slow'

# The documentation site (mkdocs + material) into site/; --strict: a broken link or a warning fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

schemas: $(STAMP)
	$(BIN)/algo schemas export schemas/json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
