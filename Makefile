# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-text test install lint bench clean serve mutation

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m continual.demo

# The same four acts with a text classifier (MiniLM) on Debian package descriptions (needs apt lists).
demo-text: $(STAMP)
	$(PY) -m continual.demo.text

serve: $(STAMP)
	$(VENV)/bin/continual db upgrade
	$(VENV)/bin/continual serve

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check continual tests bench
	$(VENV)/bin/ruff format --check continual tests bench

# Mutation testing of the pure cores with their fast unit tests (configured in pyproject's [tool.mutmut]);
# not part of `make test`: tens of minutes on 2 cores. Starts clean, prints the score per module and
# fails when a module scores below 85%. PostgreSQL stays out of it: these tests are about the rules.
MUTMUT_JOBS ?= 2
mutation: $(STAMP)
	rm -rf mutants
	CONTINUAL_TEST_PG_URL=off OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTMUT_JOBS) >/dev/null
	$(PY) tests/mutation_scores.py

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) data data-text demo-out demo-out-text .pytest_cache mutants
