# Two commands that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := janus janus-demos libjs-janus-gateway libjs-webrtc-adapter chromium sip-tester ffmpeg tshark iproute2 kamailio redis-server systemd

.PHONY: setup system-deps browser-user venv test lint demo bench clean

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)
	$(PY) -m pip install -q -e '.[dev]'

# Chromium never runs as root: as root the browser stage drops to this system user for Chromium only
# (stages/browser/chromium.py). Not root: Chromium runs as the caller, no user is needed.
BROWSER_USER ?= sipbridge-browser
browser-user:
	@if [ "$$(id -u)" = 0 ] && ! id -u $(BROWSER_USER) >/dev/null 2>&1; then \
	  echo "creating system user $(BROWSER_USER)"; \
	  useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin $(BROWSER_USER); \
	fi

setup: system-deps browser-user venv

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest -q --durations=25 tests

demo: setup
	$(VENV)/bin/sipbridge demo

bench: setup
	$(VENV)/bin/sipbridge bench

clean:
	rm -rf $(VENV) build *.egg-info
