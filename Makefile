# pneumoscan: two commands on a fresh machine.
#   make demo   set up, then serve the web app with the bundled model on http://127.0.0.1:8000
#   make test   set up, then run the whole test suite (browser tests included)
# Each target installs what it needs by itself: .venv (pinned wheels), npm packages, Chromium.
# `make demo` installs the light set only (requirements-demo.lock: inference and the page, no
# TensorFlow); every other target the whole set (requirements.lock: training and the tests too).
# The light lock is a subset of the full one with the same pins (tests/test_locks.py), so either
# order works in one checkout: test after demo adds what is missing, demo after test changes nothing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_VERSION := 26.3
# The editable install's build with the venv's setuptools needs wheel's bdist_wheel (the full set
# also brings it, through astunparse; the light set does not).
WHEEL_VERSION := 0.48.0

.PHONY: demo demo-setup test lint stress serve-load setup venv venv-demo node browser clean

# Serves the page with the bundled model; the URL is printed. Ctrl-C stops it.
demo: demo-setup
	$(PY) -m pneumoscan demo

# The light venv and the npm packages side by side (two jobs): pip's and npm's work overlap.
demo-setup:
	@$(MAKE) --no-print-directory -j2 venv-demo node

# With PNEUMOSCAN_REQUIRE_BROWSER=1 a browser or Node test that finds Chromium, Playwright or
# the npm packages missing fails (with one sentence) instead of being skipped.
test: lint node browser
	PNEUMOSCAN_REQUIRE_BROWSER=1 $(PY) -m pytest

# The longer checks that `make test` runs in short: training killed at random moments and
# inside its checkpoint swap (every restart must continue), and serve under load.
stress: venv node
	$(PY) -m benchmarks.robustness.fault_injection --kills 30
	$(PY) -m benchmarks.scale.serve_load --clients 50 --requests 20

# ruff, configured in pyproject.toml: the linter, then the formatter in check mode.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A bounded loopback load test of `serve` (benchmarks/scale/serve_load.py; figures in BENCHMARKS.md).
serve-load: venv node
	$(PY) -m benchmarks.scale.serve_load --clients 50 --requests 20

setup: venv node browser

venv: $(VENV)/.installed

venv-demo: $(VENV)/.installed-demo

# Each rebuilt whenever its pins or the package metadata change: a venv, pip, the lock, the
# package itself (editable). The light set is installed with --no-compile: Python compiles the
# modules a command imports when it first imports them, instead of pip compiling every file of
# every package beforehand.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

define install_lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "pip==$(PIP_VERSION)" "wheel==$(WHEEL_VERSION)"
	$(PIP_INSTALL) $(2) -r $(1)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
endef

$(VENV)/.installed: requirements.lock pyproject.toml
	$(call install_lock,requirements.lock,)
	@touch $@

# Then the light commands' own imports, once, with bytecode writing on whatever the environment
# says: their bytecode (about 5 MB) is what makes a cold start fast where Python may not write it.
$(VENV)/.installed-demo: requirements-demo.lock pyproject.toml
	$(call install_lock,requirements-demo.lock,--no-compile)
	PYTHONDONTWRITEBYTECODE= $(PY) -c "import numpy, PIL.Image, pydicom, rich.progress, ai_edge_litert.interpreter, pneumoscan.cli, pneumoscan.serve"
	@touch $@

node: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Debian's Chromium for the browser tests (Playwright cannot download browsers here).
browser:
	@if [ -n "$$CHROMIUM" ] && [ -x "$$CHROMIUM" ]; then exit 0; fi; \
	if command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	echo "Installing Debian's chromium for the browser tests"; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null

clean:
	rm -rf $(VENV) node_modules .pytest_cache
