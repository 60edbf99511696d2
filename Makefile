# One entry point for humans and CI. `make test` is the whole check (CI runs .ci/run -> make test).
.PHONY: setup images unit lint integration test demo bench clean docs

VENV := .venv/bin

# Host packages, .venv, a running Docker engine and the images; fast when all is in place.
setup:
	scripts/setup.sh

images:
	$(VENV)/python -m podtwin.runner.tools.images

# Unit tests get no network: a fresh network namespace with only loopback (brought up, as it
# starts down), so a test that reaches for Docker or the internet fails instead of passing by luck.
unit:
	unshare --net sh -c 'ip link set lo up && $(VENV)/pytest tests/unit -q'

# podtwin.agent and podtwin.runner live in agent/ and runner/ (package-dir mapping); the
# editable install finds them through an import hook that import-linter cannot follow, so it
# gets a real podtwin/ tree of directory symlinks (new files show up without a reinstall).
lint:
	mkdir -p .cache/lint/podtwin
	ln -sfn ../../../agent .cache/lint/podtwin/agent
	ln -sfn ../../../runner .cache/lint/podtwin/runner
	PYTHONPATH=.cache/lint $(VENV)/lint-imports

integration:
	$(VENV)/pytest integration -q --ignore=integration/kube

# Lint first: it is the cheapest to fail.
test: setup
	$(MAKE) lint
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) kube-test

demo: setup
	$(VENV)/python -m podtwin.runner.tools.demo

# docs/cli.md from the commands' own help (a unit test fails when they differ).
docs:
	$(VENV)/python -m podtwin.runner.cli_doc > docs/cli.md

bench: setup
	$(VENV)/python bench/run.py

clean:
	$(VENV)/podtwin clean

# --- Test cluster (integration/cluster, docs/cluster.md) -------------------------------------
# A real single-node Kubernetes cluster, built offline from Go modules and cached in
# ~/.cache/podtwin/cluster/<version>. PODTWIN_TEST_KUBECONFIG=<file> uses an existing cluster.
.PHONY: cluster-build cluster-up cluster-down cluster-load kube-test

cluster-build:
	integration/cluster/build.sh

# Last line printed: export KUBECONFIG=<path>
cluster-up:
	integration/cluster/up.sh

cluster-down:
	integration/cluster/down.sh

# make cluster-load IMAGE=name:tag
cluster-load:
	@test -n "$(IMAGE)" || { echo "usage: make cluster-load IMAGE=name:tag" >&2; exit 2; }
	integration/cluster/load.sh $(IMAGE)

# The Kubernetes tests (integration/kube; skipped unless PODTWIN_KUBE_TESTS=1). cluster-up
# first: on a fresh machine it builds for ~12 minutes, longer than a test's timeout; when the
# cluster is up it returns in a second. The cluster stays up afterwards (make cluster-down).
kube-test: cluster-up
	PODTWIN_KUBE_TESTS=1 $(VENV)/pytest integration/kube -q
