# The two set-up commands: `make demo` and `make test`. Each creates .venv if missing, installs torch first
# (the CPU-runnable pair this machine has on disk), then mmfast with the extras it needs, then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q
TORCH  := torch==2.14.1 torchvision==0.29.1
# the newest transformers 5.x the suite is also run on (pyproject states the tested range); 5.25 needs `kernels`
NEWEST := transformers==5.25.0 kernels==0.19.1
NEWEST_SITE := $(VENV)/newest-transformers

.PHONY: demo test test-newest lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
	@echo ">> installing $(TORCH) into $(VENV) (first time only, ~80 s)"
	$(PIP) $(TORCH)
	@touch $@

$(VENV)/.mmfast-installed: pyproject.toml constraints.txt $(VENV)/.torch-installed
	@echo ">> installing mmfast with extras video,app,eval,dev,dist"
	$(PIP) -e ".[video,app,eval,dev,dist]" -c constraints.txt
	@touch $@

demo: $(VENV)/.mmfast-installed
	HF_HUB_OFFLINE=1 $(BIN)/mmfast demo

test: $(VENV)/.mmfast-installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

$(NEWEST_SITE)/.installed: $(VENV)/.mmfast-installed
	@echo ">> installing $(NEWEST) beside the venv (PYTHONPATH overlay, the venv itself keeps the pinned versions)"
	$(PIP) --no-deps --target $(NEWEST_SITE) $(NEWEST)
	@touch $@

# the whole suite again under the newest transformers 5.x (CI runs both)
test-newest: $(NEWEST_SITE)/.installed
	PYTHONPATH=$(NEWEST_SITE) HF_HUB_OFFLINE=1 $(BIN)/python -c "import transformers; print('>> transformers', transformers.__version__)"
	PYTHONPATH=$(NEWEST_SITE) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(VENV)/.mmfast-installed
	$(BIN)/ruff check mmfast tests apps eval

bench: $(VENV)/.mmfast-installed
	$(BIN)/mmfast bench vlm-speed --accelerate "pool(factor=2)" --accelerate "random(keep=0.25)" --json out/vlm-speed.json --md out/vlm-speed.md

clean-venv:
	rm -rf $(VENV)

# the GPU suite's smoke run: the same code at tiny sizes on the CPU (eval/gpu/README.md; ~30 s)
.PHONY: gpu-smoke
gpu-smoke: $(VENV)/.mmfast-installed
	eval/gpu/run.sh --smoke
