# tally — `make help` lists the targets.
# Build output and installed tools live outside the clone so repeated runs reuse them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/tally-target
CARGO ?= cargo
# Installed tools (tansu, cargo-nextest), kept across clones like the target dir.
TALLY_TOOLS ?= $(HOME)/.cache/tally-tools
NEXTEST := $(TALLY_TOOLS)/bin/cargo-nextest
LISTEN ?= 127.0.0.1:8080
DATA ?= ./data
# The Kubernetes tests' control plane: a folder with etcd, kube-apiserver and
# kube-controller-manager. Unless given, ../shared/envtest/install.sh unpacks them (where
# it exists); expanded only by the targets that run tests.
ENVTEST_INSTALL ?= ../shared/envtest/install.sh
ifeq ($(strip $(KUBEBUILDER_ASSETS)),)
KUBEBUILDER_ASSETS = $(shell [ -f $(ENVTEST_INSTALL) ] && bash $(ENVTEST_INSTALL))
endif

.DEFAULT_GOAL := help
.PHONY: help build run run-agent test test-unit test-e2e lint fmt generate bench clean-data services services-stop services-status tools helm-lint

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

build: ## Build every binary (debug)
	$(CARGO) build --workspace --bins

run: ## Start the standalone server on 127.0.0.1:8080 with examples/quickstart (embedded store in ./data)
	$(CARGO) run -p tally-server --bin tally-server -- --listen $(LISTEN) --data $(DATA) --manifests examples/quickstart

run-agent: ## Run tally-agent with examples/agent/agent.yaml, shipping to `make run`'s server
	$(CARGO) run -p tally-agent -- --config examples/agent/agent.yaml

test: lint services tools ## Check formatting and clippy, start the services, install the test tools, then run every test with cargo-nextest (.config/nextest.toml; Kubernetes tests on a real control plane from KUBEBUILDER_ASSETS)
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --doc
	KUBEBUILDER_ASSETS="$(KUBEBUILDER_ASSETS)" $(NEXTEST) nextest run --workspace

test-e2e: services tools ## Tests that need a Kubernetes API: against KUBECONFIG when set (a control plane without scheduler or kubelets, never a real cluster), else a real control plane from KUBEBUILDER_ASSETS
	TALLY_KUBECONFIG=$(KUBECONFIG) KUBEBUILDER_ASSETS="$(KUBEBUILDER_ASSETS)" $(CARGO) test -p tally-tests --test kube_api --test control_plane --test rbac_e2e --test operator_meters --test operator_collectors --test operator_unreachable --test agent_pod_runtime --test agent_lease --test cluster_e2e --test helm_chart --test budget_enforcement --test completeness

tools: ## Install what the tests use: the Helm Go library for Python (helm-sdkpy), schemathesis 4.32.5 (in TALLY_TOOLS/st-venv) and cargo-nextest (built once into TALLY_TOOLS, about 6 minutes)
	@python3 -c 'import helm_sdkpy, yaml' 2>/dev/null || python3 -m pip install --quiet --ignore-requires-python helm-sdkpy cffi pyyaml
	@$(TALLY_TOOLS)/st-venv/bin/st --version 2>/dev/null | grep -q 4.32.5 || { echo "installing schemathesis 4.32.5 into $(TALLY_TOOLS)/st-venv (once per machine)"; python3 -m venv $(TALLY_TOOLS)/st-venv && $(TALLY_TOOLS)/st-venv/bin/pip install --quiet schemathesis==4.32.5; }
	@[ -x $(NEXTEST) ] || { echo "installing cargo-nextest into $(TALLY_TOOLS) (once per machine)"; CARGO_TARGET_DIR=$(TALLY_TOOLS)/nextest-build $(CARGO) install --locked --quiet cargo-nextest --root $(TALLY_TOOLS) && rm -rf $(TALLY_TOOLS)/nextest-build; }

helm-lint: tools ## Lint the Helm chart with its default values and with charts/tally/ci/ci-values.yaml
	python3 scripts/helm-check.py lint charts/tally
	python3 scripts/helm-check.py lint charts/tally charts/tally/ci/ci-values.yaml

services: ## Install (if missing) and start tansu (Kafka API, :9092), ClickHouse 18.16 (:8123) and ClickHouse 26.9 (:8124, chdb-core) on 127.0.0.1
	scripts/services.sh start

services-stop: ## Stop the services started by `make services`
	scripts/services.sh stop

services-status: ## Show whether the services are running
	scripts/services.sh status

test-unit: ## Only the fast unit tests
	$(CARGO) test --workspace --lib --bins

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

generate: ## Regenerate the CRD YAML (crds/*.yaml and charts/tally/crds/*.yaml) from the Rust types
	$(CARGO) run -q -p tally-crds --bin crdgen -- crds charts/tally/crds

bench: services ## Benchmarks (release build): standalone vs bare SQLite; Kafka ingest, sink and ClickHouse queries vs their raw limits; budget webhook latency; agent RSS and CPU; operator time to 200 Ready Meters
	$(CARGO) bench -p tally-server --bench standalone
	$(CARGO) bench -p tally-server --bench scaleout
	$(CARGO) bench -p tally-server --bench budgets
	$(CARGO) build -q --profile agent -p tally-agent
	KUBEBUILDER_ASSETS="$(KUBEBUILDER_ASSETS)" TALLY_BENCH_AGENT_BIN=$(CARGO_TARGET_DIR)/agent/tally-agent $(CARGO) bench -p tally-tests --bench agent
	KUBEBUILDER_ASSETS="$(KUBEBUILDER_ASSETS)" $(CARGO) bench -p tally-tests --bench operator

clean-data: ## Delete the standalone server's ./data
	rm -rf $(DATA)
