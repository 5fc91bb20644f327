# moshpit: make demo | make test | make test-matrix | make lint | make bench | make dist
PYTHON ?= python3
VENV   ?= .venv
VPY     = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
PYENV_ROOT ?= /root/.pyenv
MATRIX_VERSIONS = 3.9 3.10 3.11 3.12 3.13
# Tests mostly wait on real processes, sockets and timers, so they run several at a time even
# on two cores; tests that add system users run their account tools one at a time
# (tests/users_util.py account_tool) instead of all on one worker.
PYTEST_WORKERS ?= 4
PYTEST = -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup
# The tests start mps.py and mp.py hundreds of times and pytest rewrites every test module:
# Python keeps their compiled bytecode (__pycache__, git-ignored) even where the environment
# sets PYTHONDONTWRITEBYTECODE, which would recompile them all at every start.
KEEP_BYTECODE = PYTHONDONTWRITEBYTECODE=

.PHONY: demo test lint test-matrix bench dist clean test-tools

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VPY) -m ruff check .

test: lint test-tools
	$(KEEP_BYTECODE) $(VPY) $(PYTEST) $(PYTEST_ARGS)

# tmux is the terminal the screen model is checked against (tests/test_term_tmux.py); the
# prediction harness (tests/test_predict_tmux.py) also types into zsh and fish; nft is the
# firewall that blocks UDP in tests/test_carrier_netns.py. Install the missing ones when we
# may (root with apt-get); otherwise those tests skip, saying why. Each is command:package.
TEST_TOOLS = tmux:tmux zsh:zsh fish:fish nft:nftables
test-tools:
	@missing=$$(for t in $(TEST_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || echo $${t#*:}; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q $$missing >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1; }; }; } \
	  || echo "test-tools: $$missing missing and could not be installed: their tests will skip"

# Every interpreter found under pyenv with the newest cryptography, plus 3.9 with the
# oldest cryptography we support (3.4.8). Long scenarios run once, in `make test`.
test-matrix:
	@found=0; for v in $(MATRIX_VERSIONS); do \
	  py=$$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python 2>/dev/null | tail -n 1); \
	  [ -n "$$py" ] || { echo "test-matrix: no Python $$v, skipped"; continue; }; \
	  found=1; \
	  $(MAKE) --no-print-directory matrix-one PY=$$py VENV=.venv-$$v CRYPTO= || exit 1; \
	  if [ $$v = 3.9 ]; then \
	    $(MAKE) --no-print-directory matrix-one PY=$$py VENV=.venv-3.9-crypto34 CRYPTO='cryptography==3.4.8' || exit 1; \
	  fi; \
	done; [ $$found = 1 ] || echo "test-matrix: no interpreters found"

matrix-one:
	@echo "== test-matrix: $(PY) $(CRYPTO)"
	@[ -x $(VENV)/bin/python ] || $(PY) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q --upgrade pip
	@$(VENV)/bin/python -m pip install -q -r requirements-dev.txt $(CRYPTO)
	$(KEEP_BYTECODE) $(VENV)/bin/python $(PYTEST) -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) tests/demo.py

# The screen model and the transport alone (issue targets: MB/s; throughput, added round
# trip, loss), then whole sessions side by side with OpenSSH and Mosh where they are installed.
bench: $(STAMP)
	$(VPY) bench/bench_term.py
	$(VPY) bench/bench_transport.py
	$(VPY) bench/run.py $(BENCH_ARGS)

# One file to copy: every module and program in a stdlib zipapp, run as
# `python3 dist/moshpit.pyz mps|mp|keygen ARGS`. moshpit_pyz.py is its __main__.py (it picks
# the program and exits with its status; zipapp's own -m entry would drop the status).
# Each NAME.py has its NAME.pyc beside it, compiled by $(PYTHON): zipimport loads nothing but
# a .pyc from a zip (it never writes one), so without them every start recompiled every module
# (about 250 ms of CPU more than mps.py). The .pyc are checked-hash: valid whatever the files'
# dates, checked against the source in the zip; another Python (another bytecode magic number)
# skips them and compiles the sources.
DIST ?= dist
DIST_FILES = $(filter-out moshpit_pyz.py,$(sort $(wildcard moshpit*.py))) mps.py mp.py mp_keygen.py

dist: $(DIST)/moshpit.pyz

$(DIST)/moshpit.pyz: $(DIST_FILES) moshpit_pyz.py
	rm -rf $(DIST)/stage
	mkdir -p $(DIST)/stage
	cp $(DIST_FILES) $(DIST)/stage/
	cp moshpit_pyz.py $(DIST)/stage/__main__.py
	$(PYTHON) -m compileall -q -b --invalidation-mode checked-hash $(DIST)/stage
	$(PYTHON) -m zipapp $(DIST)/stage -o $@ -p '/usr/bin/env python3' -c
	rm -rf $(DIST)/stage
	@echo "built $@: copy it anywhere and run python3 $@ mps|mp|keygen"

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .ruff_cache .hypothesis dist
