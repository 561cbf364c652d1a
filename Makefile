PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench bench-quick samples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,onnx]'
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

DEMO := demo_out
SAMPLES := sample_checkpoints
HELDOUT := --inputs $(SAMPLES)/heldout_images

demo: $(STAMP)
	@mkdir -p $(DEMO)
	@echo "== what is in a training checkpoint"
	$(BIN)/repfuse inspect $(SAMPLES)/vanillanet_tiny.pth
	@echo; echo "== VanillaNet (deep training finished): convert, then verify on held-out images"
	$(BIN)/repfuse convert $(SAMPLES)/vanillanet_tiny.pth --arch vanillanet -o $(DEMO)/vanillanet_tiny.deploy.safetensors --force
	$(BIN)/repfuse verify $(SAMPLES)/vanillanet_tiny.pth $(DEMO)/vanillanet_tiny.deploy.safetensors $(HELDOUT)
	@echo; echo "== RepVGG (DDP checkpoint, module. prefixes)"
	$(BIN)/repfuse convert $(SAMPLES)/repvgg_tiny.pth.tar -o $(DEMO)/repvgg_tiny.deploy.safetensors --force
	$(BIN)/repfuse verify $(SAMPLES)/repvgg_tiny.pth.tar $(DEMO)/repvgg_tiny.deploy.safetensors $(HELDOUT)
	@echo; echo "== ONNX: export the RepVGG sample; onnxruntime runs the file at batch 1 and 3 and on the held-out images"
	$(BIN)/repfuse export $(SAMPLES)/repvgg_tiny.pth.tar -o $(DEMO)/repvgg_tiny.onnx --resolution 32 $(HELDOUT) --force
	@echo; echo "== timm test_efficientnet (conv-bn, timm train.py checkpoint, EMA weights)"
	$(BIN)/repfuse convert $(SAMPLES)/test_efficientnet.pth.tar --key state_dict_ema -o $(DEMO)/test_efficientnet.deploy.safetensors --force
	$(BIN)/repfuse verify $(SAMPLES)/test_efficientnet.pth.tar $(DEMO)/test_efficientnet.deploy.safetensors --key state_dict_ema $(HELDOUT)
	@echo; echo "== deploy speed on this machine"
	$(BIN)/repfuse bench $(SAMPLES)/repvgg_tiny.pth.tar $(DEMO)/repvgg_tiny.deploy.safetensors --batch 1 --batch 32 --resolution 32 --repeats 20

samples: $(STAMP)
	$(BIN)/python $(SAMPLES)/make_samples.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
