# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Each creates or refreshes the local virtual environment .venv when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs

.PHONY: demo hippo-demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,plot,tasks]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssmkit compare --out $(OUT)/compare

hippo-demo: $(STAMP)
	$(PY) -m ssmkit.demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# everything but the tests marked slow (@pytest.mark.slow, pytestmark or pytest.param marks): under 90 s
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_lti.py
	$(PY) benchmarks/bench_mamba.py
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
