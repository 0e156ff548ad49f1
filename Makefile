# make train: install, then train gpt_moe_tiny on the embedded corpus on 2 CPU processes with expert parallelism and
# the balanced placement policy on cost figures measured at start-up. make test: install, then the full suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
TRAIN ?= recipe=gpt_moe_tiny trainer.devices=2 parallel.ep=2 placement.policy=balanced placement.extra_slots=1 \
	placement.calibrate=true placement.interval=10 placement.heatmap_every=50 logger=[csv,tensorboard]

.PHONY: install train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/smartmoe-train $(TRAIN) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
