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

.PHONY: demo test test-newest test-oldest kernel-check lint wheel-check bench-cpu bench-gpu readme-table clean FORCE

# One virtual environment per transformers release (.venv-<version>). It records the torch it was built with, so
# a different TORCH_SPEC (or a changed pyproject.toml) rebuilds it.
.PRECIOUS: .venv-%/ready .venv-%/torch-spec
.venv-%/torch-spec: FORCE
	@mkdir -p $(@D)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

.venv-%/ready: pyproject.toml .venv-%/torch-spec
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

# Our Triton kernels without a GPU: Triton's interpreter runs them on CPU tensors with numpy, and the tests marked
# `kernels` compare them with the float64 reference path (on a CUDA machine the same tests run on the GPU). The
# variants they launch are also compiled for sm_90 by the Triton the GPU machine has (GPU_TRITON_SPEC, installed
# apart: its interpreter is older than TRITON_SPEC's).
TRITON_SPEC ?= triton==3.9.0
GPU_TRITON_SPEC ?= triton==3.6.0
.venv-kernels/ready: pyproject.toml .venv-kernels/torch-spec
	$(PYTHON) -m venv .venv-kernels
	.venv-kernels/bin/pip install -q --disable-pip-version-check "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	.venv-kernels/bin/pip install -q --disable-pip-version-check "transformers==$(NEWEST_TRANSFORMERS)" -e ".[test]"
	.venv-kernels/bin/pip install -q --disable-pip-version-check --no-deps --target .venv-kernels/gpu-triton \
		"$(GPU_TRITON_SPEC)"
	touch $@

kernel-check: .venv-kernels/ready
	TRITON_INTERPRET=1 BT_COMPILE_TRITON=$(CURDIR)/.venv-kernels/gpu-triton \
		.venv-kernels/bin/python -m pytest -q -m kernels tests/test_ops.py

RUFF ?= ruff==0.14.0
MYPY ?= mypy==2.4.1

lint: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/pip install -q --disable-pip-version-check "$(RUFF)" "$(MYPY)"
	.venv-$(NEWEST_TRANSFORMERS)/bin/ruff check src tests benchmarks
	.venv-$(NEWEST_TRANSFORMERS)/bin/ruff format --check src tests benchmarks
	.venv-$(NEWEST_TRANSFORMERS)/bin/mypy src --ignore-missing-imports

# Build the wheel, install it into a fresh virtual environment (no source tree on the path) and use it there: a
# packaging mistake (a module left out, a broken entry point) fails here.
WHEEL_CHECK = from transformers import BertConfig, BertModel; import torch, bettertransformer as bt; \
	m = bt.transform(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, \
	intermediate_size=37, vocab_size=99)).eval()); mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]); \
	m(input_ids=mask * 7, attention_mask=mask); assert bt.call_counts(m)["fast"] == 1; \
	print("installed wheel OK:", bt.__file__)

wheel-check:
	rm -rf dist .venv-wheel
	$(PYTHON) -m pip wheel -q --disable-pip-version-check --no-deps -w dist .
	$(PYTHON) -m venv .venv-wheel
	.venv-wheel/bin/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	.venv-wheel/bin/pip install -q --disable-pip-version-check dist/bettertransformer-*.whl "transformers==$(NEWEST_TRANSFORMERS)"
	cd /tmp && $(CURDIR)/.venv-wheel/bin/bettertransformer list > /dev/null
	cd /tmp && $(CURDIR)/.venv-wheel/bin/python -c '$(WHEEL_CHECK)'

bench-cpu: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/python benchmarks/encoder_cpu.py

# On a CUDA machine with torch, transformers and triton already installed.
bench-gpu:
	PYTHONPATH=src:benchmarks $(PYTHON) benchmarks/encoder_gpu.py

# Regenerate the README's supported-model table from the registry (a test fails while it is stale).
readme-table: .venv-$(NEWEST_TRANSFORMERS)/ready
	.venv-$(NEWEST_TRANSFORMERS)/bin/python -m bettertransformer.registry

clean:
	rm -rf .venv-*/ .venv-wheel build dist *.egg-info src/*.egg-info

FORCE:
