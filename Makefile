# The two commands of the README: `make demo` (the main job on embedded defaults)
# and `make test` (lint, type check, the docs build and the whole test suite). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck docs pytest bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: setup
	$(PY) -m mypy .

# The documentation (docs/, mkdocs.yml) in strict mode: a broken link, a link to a missing
# heading or a page missing from the nav fails the build, and with it `make test`.
docs: setup
	$(PY) -m mkdocs build --strict --site-dir site

pytest: setup
	$(PY) -m pytest

test: lint typecheck docs pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
