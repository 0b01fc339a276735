# Each target creates .venv and installs what it needs (torch from the pinned CPU-capable wheels first).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.classforge-installed

.PHONY: demo test test-fast install browser lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[audio,serve,hpo,hf,track,preprocess,audit,dev]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the browser tests (Debian package; needs root, skipped otherwise).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"; }

demo: install
	$(VENV)/bin/classforge demo

test: install browser
	$(VENV)/bin/python -m pytest -q -ra

test-fast: install
	$(VENV)/bin/python -m pytest -q -ra -m "not slow and not browser and not trains and not server"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
