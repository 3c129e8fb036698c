# The two commands a new user needs (see README):
#   make demo   set up a virtualenv and run the main job on the built-in miniature FLAIR-2
#   make test   set up a virtualenv and run lint + the whole test suite (what .ci/run calls)
#   make bench  the CPU benchmarks (ratios measured side by side; figures in benchmarks/RESULTS.md)
#
# Variables a cluster user may override:
#   PYTHON       interpreter for the virtualenv (>= 3.11)            default: python3
#   VENV         virtualenv folder                                   default: .venv
#   TORCH_SPEC   torch requirement installed first                   default: torch==2.13.0
#   TORCH_INDEX  extra index for CUDA wheels, e.g. V100 (sm_70):
#                https://download.pytorch.org/whl/cu126              default: none
#   DEMO_DIR     where the demo writes its data and runs             default: runs/demo

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= runs/demo

BIN := $(VENV)/bin
STAMP := $(VENV)/.damformer-installed
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install demo test lint bench lock clean-demo

install: $(STAMP)

# torch goes in first and alone: installed afterwards as a dependency, pip could resolve it to a
# newer release with gigabytes of CUDA wheels (docs: infra.md).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "damformer needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX_ARG)
	$(BIN)/python -m pip install --quiet -e ".[deepspeed,dev,ui]" -c constraints.txt
	$(BIN)/python -m pip check
	@touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash launch/demo.sh "$(DEMO_DIR)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# DeepSpeed JIT-compiles its CPU comm op on first use (30-35 s): once here, not in every test.
# Two pytest workers (CI has two cores), one thread each (tests/conftest.py). Much of the suite waits
# on subprocesses, Slurm and sockets: the other worker runs then. --dist loadfile keeps a file's tests
# on one worker, so each module-scoped fixture (trained checkpoints, the Slurm cluster) is built once
# (--dist loadgroup, single tests handed out, measured no faster: 946 s against 918 s; nor a third
# worker on the 2 cores: 1188 s against 1186 s on a clean clone, 2026-12-03, the long files only get
# slower). Files go out heaviest first (tests/conftest.py HEAVY_FIRST), not by their number of tests.
test: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m damformer.engine.strategies.deepspeed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The CPU suite (running time: benchmarks/RESULTS.md): detailed tables per script, then one summary of ratios.
bench: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m damformer.engine.strategies.deepspeed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/run_all.py

# Refresh constraints.txt (every dependency pinned, what make demo / make test install against): resolve
# the newest versions pyproject.toml allows in a fresh virtualenv, and freeze them.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX_ARG)
	.lock-venv/bin/python -m pip install --quiet ".[deepspeed,dev,ui]"
	printf '%s\n' "# Every dependency pinned: what \`make demo\` and \`make test\` install against (pip -c). Refresh: \`make lock\`" \
		"# (resolves the newest versions pyproject.toml allows in a fresh virtualenv, then freezes them)." > constraints.txt
	.lock-venv/bin/python -m pip freeze --exclude damformer --exclude torch >> constraints.txt
	rm -rf .lock-venv

clean-demo:
	rm -rf "$(DEMO_DIR)"
