# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DOCS_SOURCES := /usr/share/doc/python3.11/html/_sources

.PHONY: demo test venv corpus bench clean finetune-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: the CPU wheel for 2.13.0 is what this machine serves without a multi-GB CUDA download
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $@

venv: $(STAMP)

# the default corpus: Python's documentation sources from Debian's python3.11-doc package
corpus:
	@if [ ! -d "$(DOCS_SOURCES)" ]; then \
	  echo "installing the default corpus (python3.11-doc)"; \
	  (apt-get update -qq && apt-get install -y -qq python3.11-doc) >/dev/null 2>&1 || \
	  (command -v sudo >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq python3.11-doc) >/dev/null 2>&1 || \
	  echo "warning: could not install python3.11-doc; the harness falls back to the standard library's sources (--data picks any text)"; \
	fi

# a rerun resumes runs/demo (finished methods are only scored again); DEMO_FLAGS=--overwrite trains it all again
DEMO_FLAGS ?= --resume
demo: venv corpus
	$(VENV)/bin/galore-mini compare --model tiny --out runs/demo $(DEMO_FLAGS)

# fine-tuning demo: pretrain tiny (or reuse runs/finetune-demo/pretrain), then five methods x 3 seeds on the
# Debian package-section task built from apt's package lists (`apt-get update` once if apt knows no packages)
finetune-demo: venv corpus
	$(VENV)/bin/galore-mini finetune --out runs/finetune-demo

test: venv corpus
	$(PY) -m pytest -n 2 -q

bench: venv
	$(PIP) install --quiet -e ".[bench]"
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
