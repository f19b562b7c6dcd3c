# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum setup.py | cut -c1-12)
# Tests run on CPU (tests/conftest.py forces 8 host devices for the mesh tests).
TEST_ENV := JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3

.PHONY: test lint format demo venv clean java chromium

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# Format and lint first (about a second): a style slip fails before the slow tests.
test: lint java chromium
	$(TEST_ENV) $(PY) -m pytest -q tests

# The caption metrics' PTB tokenizer and METEOR are Java programs (pycocoevalcap);
# their tests need it, so a machine without Java gets Debian's headless JRE.
java:
	@command -v java >/dev/null || { apt-get update -qq && apt-get install -y -qq \
	  --no-install-recommends default-jre-headless >/dev/null; }

# The browser test of `kosmos-jax serve`'s page drives Debian's Chromium through
# Playwright (a `playwright install` download cannot work offline).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq \
	  --no-install-recommends chromium >/dev/null; }

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Trains configs/shapes.py from scratch on the synthetic shapes mixture (CPU, 3-4
# minutes on 2 cores at a 450-500 GFLOP/s matmul peak), scores referring expressions
# on held-out pictures and writes pictures with boxes and summary.json into demo_out/.
demo: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/kosmos-jax demo --config configs/shapes.py --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
