# Two entry points: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create .venv/ when it is missing.
#
# TORCH_SPEC picks the torch build installed before the project. The default takes
# torch 2.13.0; on a machine whose pip finds the CPU wheel locally that is the CPU build.
# GPU users: make TORCH_SPEC="torch" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
TEACHER ?= HuggingFaceTB/SmolLM2-135M-Instruct
DEMO_DIR ?= demo-out
DEMO_PROMPTS ?= prompts/demo_stories.jsonl
DEMO_STEPS ?= 300
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-0} $(BIN)/python -m pipeline.demo \
	    --teacher "$(TEACHER)" --out "$(DEMO_DIR)" --prompts "$(DEMO_PROMPTS)" --steps $(DEMO_STEPS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
