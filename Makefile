# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# Each creates .venv on first use; the stamp file makes a second run install nothing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# make demo LANG=en for English; LANG is usually a locale, so only en/zh count
DEMO_LANG := $(if $(filter en zh,$(LANG)),$(LANG),zh)

.PHONY: test test-emulated demo demo-instruct venv clean-venv bench app serve gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# a torch/torchvision pair that imports together (torchvision built for another torch fails on import)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c requirements/lock.txt -e '.[test]'
	# LAVIS's own pins (transformers<4.27, timm==0.4.12, ...) do not install on Python 3.11
	$(PY) -m pip install --quiet --no-deps salesforce-lavis==1.0.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests

# the kernel-sensitive specs again on emulated CPUs (CI runs this after make test): an AVX2-only CPU
# (no AVX-512, so no native bf16: oneDNN, MKL and ATen all capped) and ATen's plain, unvectorised kernels
# Each emulated CPU gets its own asset cache: the tiny LLM is pretrained on the CPU that builds it, so
# its weights, and the tokens it emits, are that CPU's (tests/conftest.py keeps Inductor's caches apart).
EMULATED_CACHE := $(or $(BLIP2_INTERNLM_CACHE),$(HOME)/.cache/blip2_internlm)/emulated
EMULATED_AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-emulated: $(STAMP)
	$(EMULATED_AVX2) BLIP2_INTERNLM_CACHE=$(EMULATED_CACHE)/avx2 $(PY) -m pytest -m kernel_sensitive tests
	ATEN_CPU_CAPABILITY=default BLIP2_INTERNLM_CACHE=$(EMULATED_CACHE)/default $(PY) -m pytest -m kernel_sensitive tests

# make demo SEEDS=42,1,2: one run per seed, with their mean and spread
demo: $(STAMP)
	$(PY) -m blip2_internlm.tools.demo --lang $(DEMO_LANG) $(if $(SEEDS),--seeds $(SEEDS))

# instruction tuning on the shapes data, with the LLM frozen and with LoRA: make demo-instruct SEEDS=42,1,2 LANG=en
demo-instruct: $(STAMP)
	$(PY) -m blip2_internlm.tools.demo_instruct --lang $(DEMO_LANG) $(if $(SEEDS),--seeds $(SEEDS))

bench: $(STAMP)
	$(PY) -m blip2_internlm.tools.bench --size small

# the checks that need a GPU, one run within 8 minutes: report in output/gpu-check (exit 2 without CUDA);
# GPU_CHECK_ARGS="--dry-run" lists them without a GPU, e.g. also "--only bench_real --out DIR"
gpu-check: $(STAMP)
	$(PY) -m blip2_internlm.tools.gpu_check $(GPU_CHECK_ARGS)

# the web demo on the model `make demo` trained (its newest stage-2 checkpoint), http://127.0.0.1:8501;
# more options with APP_ARGS, e.g. make app APP_ARGS="--port 8600 --max-waiting 8" (serving beyond
# loopback: docs/app.md, the page has no authentication)
app: $(STAMP)
	$(PY) -m blip2_internlm.tools.app --from-demo output/demo $(APP_ARGS)

# the OpenAI-compatible server (docs/serve.md) on the model `make demo` trained, http://127.0.0.1:8000/v1;
# more options with SERVE_ARGS, e.g. make serve SERVE_ARGS="--port 8100 --max-batch 8" (no authentication)
serve: $(STAMP)
	$(PY) -m blip2_internlm.serve --from-demo output/demo $(SERVE_ARGS)

clean-venv:
	rm -rf $(VENV)
