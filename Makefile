# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum setup.py | cut -c1-12)
# Tests run on CPU; 8 host devices let the sharding tests build a real mesh.
TEST_ENV := JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests

# Until the training demo lands: the smallest real job, a parameter count of each config.
demo: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/kosmos-jax summary --config configs/kosmos2.py
	$(TEST_ENV) $(VENV)/bin/kosmos-jax summary --config configs/tiny.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
