# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv when it is missing and install what they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test demo bench lint format clean cli-docs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "clanagent needs Python >= 3.11 (set PYTHON=python3.11)"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check clanagent tests bench scripts
	$(VENV)/bin/ruff format --check clanagent tests bench scripts

format: $(STAMP)
	$(VENV)/bin/ruff format clanagent tests bench scripts
	$(VENV)/bin/ruff check --fix clanagent tests bench scripts

# Shell completion and man pages from the argparse parsers, into share/ (committed).
cli-docs: $(STAMP)
	$(PY) scripts/cli_docs.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
