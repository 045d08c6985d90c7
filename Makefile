# The few targets people type. Each sets up what it needs in a virtual environment of its own.
PYTHON ?= python3
# A CPU build of torch by default (the machines this project is developed and tested on have no GPU);
# on a CUDA machine, set TORCH_SPEC to the torch you want, e.g. TORCH_SPEC=torch==2.11.0.
TORCH_SPEC ?= torch==2.13.0
# The newest transformers 5.x on PyPI at the time of the run (5.24.0 if PyPI cannot be asked), so CI follows
# new releases; the oldest supported stays pinned.
NEWEST_TRANSFORMERS ?= $(shell $(PYTHON) -m pip index versions transformers 2>/dev/null | $(PYTHON) -c \
	"import sys, re; v = re.findall(r'\b5\.\d+\.\d+\b', sys.stdin.read().partition('versions:')[2]); print(v[0] if v else '5.24.0')")
OLDEST_TRANSFORMERS ?= 5.17.0

.PHONY: demo test test-newest test-oldest lint bench-cpu bench-gpu readme-table clean

.venv-%/ready: pyproject.toml
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	.venv-$*/bin/pip install -q --disable-pip-version-check "transformers==$*" -e ".[test]"
	touch $@

demo: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/python -m bettertransformer.demo

test: test-newest test-oldest

test-newest: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/python -m pytest -q

test-oldest: .venv-$(OLDEST_TRANSFORMERS)/ready
	.venv-$(OLDEST_TRANSFORMERS)/bin/python -m pytest -q

RUFF ?= ruff==0.14.0
MYPY ?= mypy==2.4.1

lint: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/pip install -q --disable-pip-version-check "$(RUFF)" "$(MYPY)"
	.venv-$(NEWEST_TRANSFORMERS)/bin/ruff check src tests benchmarks
	.venv-$(NEWEST_TRANSFORMERS)/bin/ruff format --check src tests benchmarks
	.venv-$(NEWEST_TRANSFORMERS)/bin/mypy src --ignore-missing-imports

bench-cpu: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/python benchmarks/encoder_cpu.py

# On a CUDA machine with torch, transformers and triton already installed.
bench-gpu:
	PYTHONPATH=src:benchmarks $(PYTHON) benchmarks/encoder_gpu.py

# Regenerate the README's supported-model table from the registry (a test fails while it is stale).
readme-table: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/python -m bettertransformer.registry

clean:
	rm -rf .venv-*/ build *.egg-info src/*.egg-info
