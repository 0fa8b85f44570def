# Every target creates .venv when missing and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-clip demo-vpl test test-slow lint format mlflow-ui clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU/CUDA build; DS_BUILD_OPS=0: DeepSpeed JIT-builds what it needs
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## the main job on the embedded default (local Ray, local MLflow, synthetic data)
	$(BIN)/python jobs/pretrain_pgseg.py --config configs/pgseg/tiny.yaml run.output_dir=outputs/demo

demo-clip: $(STAMP)  ## the tiny CLIP on the same embedded default
	$(BIN)/python jobs/pretrain_clip.py --config configs/clip/tiny.yaml run.output_dir=outputs/demo

CLIP_RUN := outputs/demo/ray_results/clip_tiny

demo-vpl: $(STAMP)  ## VPL on synthetic VOC: tiny CLIP (once), phase 1 (prototypes, seeds with text and vision prototypes), phase 2 (decoder with RSC, eval)
	test -d $(CLIP_RUN) || $(BIN)/python jobs/pretrain_clip.py --config configs/clip/tiny.yaml run.output_dir=outputs/demo
	$(BIN)/python jobs/vpl_prototypes.py --config configs/vpl/tiny.yaml run.output_dir=outputs/demo
	$(BIN)/python jobs/vpl_pseudo_labels.py --config configs/vpl/tiny.yaml run.output_dir=outputs/demo cam.prototypes=text
	$(BIN)/python jobs/vpl_pseudo_labels.py --config configs/vpl/tiny.yaml run.output_dir=outputs/demo cam.prototypes=vision
	$(BIN)/python jobs/train_vpl.py --config configs/vpl/train_tiny.yaml run.output_dir=outputs/demo
	$(BIN)/python jobs/eval_vpl.py --config configs/vpl/eval_tiny.yaml run.output_dir=outputs/demo

test: $(STAMP)  ## the default suite (CPU, < 20 min on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## the long checks too
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

mlflow-ui: $(STAMP)  ## open the dashboard on the demo's store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/demo/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs .pytest_cache
