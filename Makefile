# Everything a fresh machine needs: `make demo` and `make test` create .venv and install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test test-fast lint format bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# the dashboard test drives Debian's chromium (Playwright's own browser download is not used)
APT := $(shell [ "$$(id -u)" = 0 ] || echo sudo) apt-get
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	command -v chromium >/dev/null || $(APT) install -y --no-install-recommends chromium \
		|| { $(APT) update && $(APT) install -y --no-install-recommends chromium; }
	touch $@ $(VENV)/.installed-docs $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-docs $(VENV)/.installed

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@ $(VENV)/.installed

demo: install
	$(BIN)/coron-dask demo demo_output

# the whole suite, notebooks included, and the documentation (CI); the lanes and their
# markers: tests/README.md
test: install-test lint docs
	$(BIN)/python -m pytest

# day to day, under 2 minutes on 2 cores: every layer's numbers, without the slow, cluster,
# SLURM, browser, memory and notebook tests
FAST := not slow and not cluster and not slurm and not browser and not memory and not notebook
test-fast: install-test
	$(BIN)/python -m pytest -m "$(FAST)"

# the site, into site/; any warning (a broken link, a docstring that does not render) fails it
docs: $(VENV)/.installed-docs
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# not part of `make test`: about half an hour, results in benchmarks/results/
bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run

lint: install-test
	$(BIN)/ruff check coron_dask tests benchmarks
	$(BIN)/ruff format --check coron_dask tests benchmarks

format: install-test
	$(BIN)/ruff format coron_dask tests benchmarks
	$(BIN)/ruff check --fix coron_dask tests benchmarks

clean:
	rm -rf $(VENV) demo_output site .pytest_cache .ruff_cache *.egg-info
