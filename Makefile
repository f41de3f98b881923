# sandboxd — make targets. `make help` lists them.
# Targets that touch the host (apt, images, the service) need root: run them with sudo.

SHELL       := /bin/bash
# Debian's python3 where there is one: a venv on it can be run by the gateway's own user.
PYTHON      ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV        := .venv
BIN         := $(VENV)/bin
APT_PACKAGES := bubblewrap mmdebstrap uidmap e2fsprogs python3-venv curl lz4 qemu-system-x86 nftables gcc libc6-dev
# What make deb and make docker-build use, and the tools the tests check with (a browser,
# HAProxy for contrib/haproxy.cfg).
BUILD_PACKAGES := dpkg-dev binutils lintian podman runc chromium haproxy
SOCKET      ?= /run/sandboxd.sock
LOG         ?= /var/log/sandboxd.log
GATEWAY_LOG ?= /var/log/sandboxd-gateway.log
PIDFILE     ?= /run/sandboxd.pid
GATEWAY_PIDFILE ?= /run/sandboxd-gateway.pid
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

.PHONY: deps apt-deps test-clients
deps: apt-deps $(BIN)/sandboxd test-clients ## Install the Debian packages (root), the Python venv and the test clients
apt-deps:
	@missing=$$(for p in $(APT_PACKAGES) $(BUILD_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The real clients the tests drive (tests/clients: the npm piston-client), pinned by the
# lock file; Debian's npm if the machine has none.
test-clients:
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	npm ci --prefix tests/clients --no-audit --no-fund --silent

# Bytecode of the tree, as a package install has it: with PYTHONDONTWRITEBYTECODE (or a
# tree its users cannot write) every sandboxctl would compile its modules again.
BYTECODE    = $(BIN)/python -m compileall -q sandboxd sandboxctl guest bench

# Editable as a plain path entry (compat): the default finder costs every start of a
# venv program (sandboxctl, the gateway) some 15 ms of imports.
EDITABLE    := --config-settings editable_mode=compat

$(BIN)/sandboxd: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(EDITABLE) -e '.[test]'
	$(BYTECODE)
	@touch $@

# What the daemon runs as root to start every jail (sandboxd/host/enter_jail.c), built
# with the host's compiler and Debian's hardening flags. Static (and position-independent,
# for ASLR): the dynamic loader's work was a quarter of its exec, paid by every sandbox.
LAUNCHER    := sandboxd/host/enter-jail
$(LAUNCHER): sandboxd/host/enter_jail.c Makefile
	cc $$(dpkg-buildflags --get CFLAGS) $$(dpkg-buildflags --get CPPFLAGS) -Wall -Wextra -Werror \
	    $$(dpkg-buildflags --get LDFLAGS) -static-pie -o $@ $<

.PHONY: build image build-rootfs download-kernel setup-env
build: deps image $(LAUNCHER) ## Install everything and build the sandbox image
image: $(BIN)/sandboxd ## Build the sandbox image (cached by its recipe: a no-op when unchanged)
	$(BIN)/sandboxd image build
# The original's names for parts of what the image holds.
build-rootfs: image ## The sandboxes' root tree (with the runtimes): part of the image
download-kernel: image ## The VMs' kernel (fetched with apt): part of the image
setup-env: image ## Kernel and root tree: the image

.PHONY: run run-dev
run: build ## Run the daemon in the foreground
	$(BIN)/sandboxd run --socket $(SOCKET)
run-dev: build ## Run the daemon in the foreground with debug logging
	SANDBOXD_LOG_LEVEL=debug $(BIN)/sandboxd run --socket $(SOCKET) --pool-size 1

.PHONY: test test-fast test-api dev
test: build ## Run the whole test suite (root: real jails, cgroups and namespaces)
	$(BIN)/pytest $(PYTEST_ARGS)
test-fast: $(BIN)/sandboxd ## The request path's logic with local sandboxes: seconds, no root, no image
	$(BIN)/pytest tests/fast $(PYTEST_ARGS)
API_URL     ?= http://localhost:8000
test-api: $(BIN)/sandboxd ## The README's curl examples against a running gateway (API_URL), checked
	$(BIN)/python -m tests.readme_api $(API_URL)
dev: ## Clean, build and test: the development cycle
	$(MAKE) clean
	$(MAKE) test

# The guest agent alone, on this terminal: one JSON message per line in and out (the
# protocol is in guest/agent/__init__.py). Unjailed, so as root it runs as nobody.
AGENT_WORKDIR ?= /tmp/sandboxd-agent
AS_NOBODY   = $(if $(filter 0,$(shell id -u)),setpriv --reuid=nobody --regid=nogroup --clear-groups,)
.PHONY: run-agent
run-agent: ## The guest agent standalone on stdin/stdout, for debugging (AGENT_WORKDIR)
	@install -d -m 0777 $(AGENT_WORKDIR)
	@echo 'agent: one job per run, e.g.: {"type": "job", "files": [{"path": "main.py", "content": "print(2+2)"}], "run": {"argv": ["python3", "main.py"]}, "limits": {"wall_time": 5, "cpu_time": 5, "compile_time": 5, "memory_bytes": 268435456, "processes": 16, "output_bytes": 65536, "file_size_bytes": 1048576}}' >&2
	@cd $(AGENT_WORKDIR) && PYTHONPATH=$(CURDIR) $(AS_NOBODY) $(PYTHON) -m guest.agent --workdir $(AGENT_WORKDIR)

.PHONY: bench bench-quick
bench: build ## The benchmark of record (bench/results/), then gateway, network and VM figures (root)
	$(BIN)/pip install -q $(EDITABLE) -e '.[test,bench]'
	$(BYTECODE)
	$(BIN)/python -m bench.record
	$(BIN)/python -m bench.gateway_overhead
	$(BIN)/python -m bench.network_overhead
	$(BIN)/python -m bench.vm_startup

bench-quick: build ## The python line of the benchmark of record, in under a minute (root)
	$(BIN)/pip install -q $(EDITABLE) -e '.[test,bench]'
	$(BYTECODE)
	$(BIN)/python -m bench.record --quick

.PHONY: soak
soak: build ## A soak with faults: 10,000 mixed jobs at concurrency 16 through socket and gateway (root)
	$(BIN)/pip install -q $(EDITABLE) -e '.[test,bench]'
	SOAK_JOBS=$${SOAK_JOBS:-10000} SOAK_CONCURRENCY=$${SOAK_CONCURRENCY:-16} $(BIN)/python -m bench.soak

.PHONY: deb docker-build
deb: $(BIN)/sandboxd $(LAUNCHER) ## Build the Debian package into dist/ (then: sudo apt install ./dist/sandboxd_*.deb)
	packaging/build-deb dist $(BIN)/python
docker-build: deb ## The container image localhost/sandboxd (podman or docker), from Debian packages only
	contrib/container/build $$(ls -t dist/sandboxd_*_amd64.deb | head -1)

.PHONY: fmt lint
fmt: $(BIN)/sandboxd ## Format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
lint: $(BIN)/sandboxd ## Lint (ruff) and type-check (mypy) without changing anything
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

.PHONY: quickstart install install-service setup-network start stop status
quickstart: build install start ## Install everything and start the service
	@$(BIN)/sandboxctl --socket $(SOCKET) health
	@echo "try: sandboxctl exec -l python -c 'print(2+2)'"
	@echo " or: curl -X POST http://localhost:8000/execute -H 'Content-Type: application/json' -d '{\"language\": \"python\", \"code\": \"print(2 + 2)\"}'"

install: $(BIN)/sandboxd ## Put the commands on PATH, add the sandboxd group and user, config
	getent group sandboxd >/dev/null || groupadd --system sandboxd
	getent passwd sandboxd-gateway >/dev/null || useradd --system --user-group --no-create-home \
	  --home-dir /nonexistent --shell /usr/sbin/nologin --groups sandboxd sandboxd-gateway
	install -d /etc/sandboxd
	[ -e /etc/sandboxd/sandboxd.toml ] || install -m 0644 contrib/sandboxd.toml /etc/sandboxd/sandboxd.toml
	ln -sf $(CURDIR)/$(BIN)/sandboxctl /usr/local/bin/sandboxctl
	ln -sf $(CURDIR)/$(BIN)/sandboxd /usr/local/bin/sandboxd
	ln -sf $(CURDIR)/$(BIN)/sandboxd-gateway /usr/local/bin/sandboxd-gateway

# DESTDIR: only write the units there (a staging tree), enable nothing.
UNIT_DIR    = $(DESTDIR)/etc/systemd/system
install-service: ## Install the systemd units of this checkout's daemon and gateway, enabled
	install -d $(UNIT_DIR)
	sed 's|@SANDBOXD@|$(CURDIR)/$(BIN)/sandboxd|g' contrib/sandboxd.service > $(UNIT_DIR)/sandboxd.service
	sed 's|@GATEWAY@|$(CURDIR)/$(BIN)/sandboxd-gateway|' contrib/sandboxd-gateway.service > $(UNIT_DIR)/sandboxd-gateway.service
	install -m 0644 contrib/sandboxd.socket $(UNIT_DIR)/sandboxd.socket
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl daemon-reload && systemctl enable sandboxd.socket sandboxd sandboxd-gateway; \
	else echo "units written to $(UNIT_DIR); systemd is not running here (or DESTDIR is set): nothing enabled"; fi

# sandboxd makes its links, namespaces and nftables rules itself, per job that asks:
# unlike the original, there is no bridge to set up. This checks what that needs.
setup-network: ## Check what network on request needs (nftables, /dev/net/tun) and show the config it takes
	@command -v nft >/dev/null || { echo "nftables is missing: make apt-deps"; exit 1; }
	@test -c /dev/net/tun || { echo "/dev/net/tun is missing (VMs' TAPs): modprobe tun"; exit 1; }
	@echo "nftables and /dev/net/tun: ok. sandboxd makes each job's link and rules itself (no bridge)."
	@echo "Sandboxes get a network only where /etc/sandboxd/sandboxd.toml lists where it may go:"
	@sed -n '/^\[network\]/,/^\[/p' contrib/sandboxd.toml | sed '$$d'

start: ## Start the daemon and the gateway (systemd when it runs, else in the background)
	@if [ -d /run/systemd/system ]; then \
	  $(MAKE) --no-print-directory install-service && systemctl start sandboxd.socket sandboxd sandboxd-gateway; \
	else \
	  if $(BIN)/sandboxctl --socket $(SOCKET) health >/dev/null 2>&1; then echo "sandboxd is already running"; \
	  else echo "no systemd here: starting sandboxd in the background (log: $(LOG))"; \
	    setsid $(BIN)/sandboxd run --socket $(SOCKET) >>$(LOG) 2>&1 < /dev/null & echo $$! > $(PIDFILE); fi; \
	  for i in $$(seq 150); do [ -S $(SOCKET) ] && break; sleep 0.2; done; \
	  if [ -f $(GATEWAY_PIDFILE) ] && kill -0 $$(cat $(GATEWAY_PIDFILE)) 2>/dev/null; then echo "the gateway is already running"; \
	  else echo "starting sandboxd-gateway as user sandboxd-gateway (log: $(GATEWAY_LOG))"; \
	    setsid setpriv --reuid sandboxd-gateway --regid sandboxd-gateway --init-groups --inh-caps=-all \
	      $(BIN)/sandboxd-gateway --socket $(SOCKET) >>$(GATEWAY_LOG) 2>&1 < /dev/null & echo $$! > $(GATEWAY_PIDFILE); fi; \
	fi
	@for i in $$(seq 150); do $(BIN)/sandboxctl --socket $(SOCKET) health >/dev/null 2>&1 && exit 0; sleep 0.2; done; \
	  echo "sandboxd did not come up; see $(LOG)"; tail -n 20 $(LOG); exit 1
	@for i in $$(seq 100); do curl -sf http://127.0.0.1:8000/health >/dev/null 2>&1 && exit 0; sleep 0.2; done; \
	  echo "the gateway did not come up; see $(GATEWAY_LOG)"; tail -n 20 $(GATEWAY_LOG); exit 1

stop: ## Stop the gateway and the daemon
	@if [ -d /run/systemd/system ]; then systemctl stop sandboxd-gateway sandboxd sandboxd.socket; \
	else \
	  for f in $(GATEWAY_PIDFILE) $(PIDFILE); do \
	    if [ -f $$f ]; then p=$$(cat $$f); kill $$p 2>/dev/null; \
	      for i in $$(seq 150); do kill -0 $$p 2>/dev/null || break; sleep 0.2; done; rm -f $$f; fi; \
	  done; \
	fi

status: ## What is installed, and the service's status
	@for p in $(APT_PACKAGES); do printf '  %-14s %s\n' $$p "$$(dpkg-query -W -f='$${Version}' $$p 2>/dev/null || echo MISSING)"; done
	@printf '  %-14s %s\n' venv "$$([ -x $(BIN)/sandboxd ] && echo ok || echo MISSING '(make deps)')"
	@[ -x $(BIN)/sandboxd ] && $(BIN)/sandboxd image list | sed 's/^/  image          /' || true
	@[ -x $(BIN)/sandboxctl ] && $(BIN)/sandboxctl --socket $(SOCKET) status || true

.PHONY: clean
clean: ## Remove the venv and caches (images stay: sandboxd image rm)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build dist
	find . -name __pycache__ -prune -exec rm -rf {} +
