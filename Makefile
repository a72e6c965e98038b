# The two set-up commands (README.md): `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SANDBOX_DIR ?= /var/tmp/carrier-sandbox
# Servers the sandbox runs and tools the tests drive (real Dovecot, sshd, gpg, swaks, tmux).
# sudo, python3-apt and systemd (systemd-analyze only; it need not run) serve the Molecule tests;
# node/npx (Debian's nodejs + npm when missing) runs the MCP Inspector interoperability test;
# dialog, vim-tiny and procps (top) are the programs the PTY tests drive on the sandbox hosts;
# python3-ansible-runner and ansible-core make a sandbox host an execution node (docs/nodes.md).
DEB_PACKAGES := dovecot-imapd dovecot-lmtpd openssh-server openssh-client gnupg swaks tmux ca-certificates \
	sudo python3-apt systemd dialog vim-tiny procps postgresql \
	python3-ansible-runner ansible-core

.PHONY: help deps venv run test lint unit integration bench sandbox-down clean

help:
	@echo "make run    - install, start the loopback sandbox, run carrier serve against it"
	@echo "make test   - install, then ruff + mypy + the whole pytest suite (what CI runs)"
	@echo "make bench  - benchmarks (tests/bench), results in tests/bench/RESULTS.md"

deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v npx >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "carrier: run as root to install:$$missing" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

run: deps venv
	$(BIN)/carrier sandbox up --dir $(SANDBOX_DIR)
	exec $(BIN)/carrier serve --config $(SANDBOX_DIR)/carrier.yml

lint: venv
	$(BIN)/ruff check carrier tests molecule
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint roles molecule playbooks

test: deps venv lint
	$(BIN)/pytest

unit: venv
	$(BIN)/pytest tests/unit

bench: deps venv
	$(BIN)/python tests/bench/run.py

sandbox-down: venv
	$(BIN)/carrier sandbox down --dir $(SANDBOX_DIR)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
