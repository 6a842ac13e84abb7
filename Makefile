# Two commands set everything up on a fresh machine:
#   make demo   installs anyseg and runs its main job on a generated scene with the built-in model
#   make test   installs anyseg with the test extras and runs the whole test suite
PYTHON ?= python3
SHARED ?= $(abspath ../shared)
OUT ?= out/demo
# The CPU build of PyTorch; an unpinned torch would pull the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install install-test demo test bench web

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	PYTHON=$(PYTHON) bash scripts/setup-test-env.sh

demo: install
	@mkdir -p $(OUT)
	$(PYTHON) -m anyseg segment $(OUT)/scene.png --multimask -o $(OUT) \
		--point $$($(PYTHON) scripts/make-demo-image.py $(OUT)/scene.png)
	@echo "a generated scene, its masks, overlay and JSON are in $(OUT)/ (model: the built-in 'nano')"

test: install-test
	ANYSEG_SHARED=$(SHARED) ANYSEG_REQUIRE_SHARED=1 $(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m anyseg bench

# Browser app assets: onnxruntime-web from npm, copied into anyseg/server/static/ort/ (git-ignored).
web:
	cd web && npm ci --ignore-scripts --no-audit --no-fund && node build.mjs
