# One entry point for humans and CI. `make test` is the whole check (CI runs .ci/run -> make test).
.PHONY: setup images unit lint integration test demo bench clean

VENV := .venv/bin

# Host packages, .venv, a running Docker engine and the images; fast when all is in place.
setup:
	scripts/setup.sh

images:
	$(VENV)/python -m podtwin.runner.adapters.images

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
	$(VENV)/pytest integration -q

# Lint first: it is the cheapest to fail.
test: setup
	$(MAKE) lint
	$(MAKE) unit
	$(MAKE) integration

demo: setup
	$(VENV)/python -m podtwin.runner.demo

bench: setup
	$(VENV)/python bench/run.py

clean:
	$(VENV)/podtwin clean
