# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
PACKAGES := -e libs/common -e services/api -e services/scheduler-proxy -e services/web-proxy

.PHONY: install install-test run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Everything the gateway needs to run, installed editable from this checkout.
install: $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) $(PACKAGES)

install-test: install
	bash tools/install_auth_deps.sh
	$(PIP) install --quiet -c $(CONSTRAINTS) -r requirements/test.txt
	$(BIN)/python tools/install_helm.py

# API + scheduler proxy + web proxy on localhost, local backend, SQLite, simple auth.
run: install
	$(BIN)/python tools/run_local.py $(ARGS)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install-test
	$(PIP) install --quiet -c $(CONSTRAINTS) -r requirements/bench.txt
	$(BIN)/python bench/proxies.py $(BENCH_ARGS)
	$(BIN)/python bench/api.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache .ruff_cache .hypothesis

# The official-client scenario against a gateway installed on a real cluster (kind,
# minikube...), as in docs/kubernetes-backend.md; not part of `make test`. Pass e.g.
# K8S_SMOKE_ARGS="--release dask-gateway --namespace dask-gateway" or
# K8S_SMOKE_ARGS="--address http://127.0.0.1:8000 --proxy-address tls://127.0.0.1:8786".
.PHONY: k8s-smoke
k8s-smoke: install
	$(BIN)/python tools/k8s_smoke.py $(K8S_SMOKE_ARGS)
