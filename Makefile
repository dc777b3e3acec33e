# hetplugin: set-up, tests, demo, benchmark.
#   make demo      simulate a small heterogeneous data set and reconstruct it (the main job)
#   make test      set up .venv (+ RELION where root) and run the fast tests
#   make test-all  the same, including tests marked slow
#   make bench     a larger timed run
SHELL      := /bin/bash
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.hetplugin-installed
BOOT_PY    ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
TORCH_PIN  ?= torch==2.13.0
PYTEST_ARGS ?=
# The demo / benchmark commands live in scripts/ so they can be edited without touching this file.
DEMO_CMD   ?= bash scripts/demo.sh $(PY) demo_out
BENCH_CMD  ?= bash scripts/bench.sh $(PY) bench_out

.PHONY: venv relion test test-all demo bench clean

venv: $(STAMP)

# Re-run the pip steps only when setup.py is newer than the stamp.
$(STAMP): setup.py
	@if [ ! -x "$(PY)" ]; then \
		echo "creating $(VENV) with $(BOOT_PY)"; \
		"$(BOOT_PY)" -m venv $(VENV); \
	fi
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	@touch $@

# RELION's programs for the peer tests: installed from Debian when root, never fatal.
relion:
	@if command -v relion_refine >/dev/null 2>&1; then \
		echo "RELION found: $$(command -v relion_refine)"; \
	elif [ "$$(id -u)" = "0" ]; then \
		echo "installing RELION (Debian package 'relion')"; \
		( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion ) \
			|| echo "RELION could not be installed: the RELION peer tests will be skipped"; \
	else \
		echo "not root and relion_refine not on PATH: the RELION peer tests will be skipped"; \
	fi

test: venv relion
	$(PY) -m pytest -q -m "not slow" hetplugin/tests $(PYTEST_ARGS)

test-all: venv relion
	$(PY) -m pytest -q hetplugin/tests $(PYTEST_ARGS)

demo: venv
	$(DEMO_CMD)

bench: venv
	$(BENCH_CMD)

clean:
	rm -rf demo_out bench_out .pytest_cache
