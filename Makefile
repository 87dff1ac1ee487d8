# make test  : create .venv (if missing), install PyTorch, the package and its dev extra, run the test suite
# make demo  : same install, then the project's main job on the embedded synthetic default
# PyTorch is installed first and on its own so that its build can be chosen:
#   make test TORCH="torch==2.13.0"                 (default: a CPU build, from a local wheel where one exists)
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"   (a CUDA build)
# Extra pip arguments for the package install: make test PIP_EXTRA="--no-deps"
# make gpu-check : on a GPU machine (PyTorch, CUDA, cupy, Lightning; no venv is made): GPU tests, GN-layer
#   benchmark with both backends, eval.py on BrainPair -> benchmarks/results/gpu.md, within ~8 minutes. Stage the
#   missing wheels and the data first where pip works: bash benchmarks/gpu_check.sh --stage (see the script).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
PIP_EXTRA ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo install lint bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(PIP_EXTRA)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .

DEMO := runs/demo
demo: $(STAMP)
	rm -rf $(DEMO) runs/synthetic2d_quick
	$(PY) train.py fit -c configs/synthetic2d_quick.yaml
	$(PY) eval.py --method learngn --ckpt $$(ls runs/synthetic2d_quick/checkpoints/best-*.ckpt | head -n 1) \
	    --split test --out $(DEMO)/learngn
	$(PY) eval.py --method gn --method-config configs/demo_gn.yaml --data synthetic2d \
	    --data-arg synthetic_shape=[96,96] --data-arg synthetic_magnitude=0.25 --data-arg num_test=16 \
	    --split test --out $(DEMO)/gn
	$(PY) eval.py --method identity --data synthetic2d --data-arg synthetic_shape=[96,96] \
	    --data-arg synthetic_magnitude=0.25 --data-arg num_test=16 --split test --out $(DEMO)/identity
	@echo "== held-out synthetic 2D test pairs =="
	@$(PY) eval.py --compare $(DEMO)/identity $(DEMO)/gn $(DEMO)/learngn | tee $(DEMO)/comparison.md
	@echo "figures: $(DEMO)/<method>/figures/*.png; per-pair results: $(DEMO)/<method>/pairs.csv"

bench: $(STAMP)
	$(PY) -m benchmarks.gn_layer

gpu-check:
	PYTHON="$(PYTHON)" bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs
