# The resilient bot stack. `make up` to run it, `make test` to test it (what CI runs).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCENARIO ?= steady
# Debian packages the stack and its tests use (installed when running as root). python3-venv
# first: stock Debian cannot create the venv without it; curl: the README's first request;
# chromium and its driver: the web chat's browser tests.
APT_PACKAGES := python3-venv curl nginx-light redis-server rabbitmq-server prometheus \
	prometheus-alertmanager prometheus-nginx-exporter prometheus-redis-exporter mtail wrk \
	docker-compose chromium chromium-driver

.PHONY: install system-deps up down status test lint typecheck unit loadtest bench clean \
	build-BotFunction bench-serverless

# The Debian packages come first (order-only): the venv needs python3-venv.
$(STAMP): pyproject.toml constraints.txt | system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,load,runner]'
	touch $(STAMP)

install: system-deps $(STAMP)

# Installs only what is missing; needs root (CI and a fresh machine run as root). Anyone else
# with packages missing gets one line naming them, and make stops.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "make: missing Debian packages:$$missing (as root: apt-get install$$missing)" >&2; \
			exit 1; fi; \
	fi

up: install
	$(BIN)/python -m infra.runner up

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.runner down; else echo "stack not running"; fi

status:
	@$(BIN)/python -m infra.runner status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/cfn-lint serverless/template.yaml

typecheck: $(STAMP)
	$(BIN)/mypy

# Test files run on TEST_WORKERS workers, a file's tests together (its stacks are shared).
TEST_WORKERS ?= 4
test: install lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

loadtest: install
	$(BIN)/python -m loadtests.run $(SCENARIO)

bench: install
	$(BIN)/python -m loadtests.bench

# The serverless variant (docs/serverless.md). `sam build` runs this target for
# serverless/template.yaml's function: the bot and its runtime dependencies (no dev, load or
# runner extras), compiled (/var/task is read-only: a module shipped without its .pyc is
# compiled again by every cold start), and the OpenAPI document /v1/openapi.json serves.
build-BotFunction:
	$(PY) -m pip install --quiet --target "$(ARTIFACTS_DIR)" -c constraints.txt .
	mkdir -p "$(ARTIFACTS_DIR)/docs" && cp docs/openapi.yaml "$(ARTIFACTS_DIR)/docs/"
	rm -rf build  # setuptools' in-tree build directory

# Cold import and per-invocation time of the Lambda handler (needs Redis and RabbitMQ).
bench-serverless: install
	$(BIN)/python -m loadtests.bench.serverless

clean: down
	rm -rf .run reports .mypy_cache .ruff_cache .pytest_cache
