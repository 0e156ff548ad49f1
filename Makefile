# make train: install, then train gpt_moe_tiny on the embedded corpus. make test: install, then the full suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/smartmoe-train recipe=gpt_moe_tiny $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
