# The two commands a newcomer needs: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= data/elpv

.PHONY: install install-dev demo test lint clean

# The demo needs the runtime and the offline weights' converter (onnx) only; the tests add pytest, ruff, Ray,
# onnxruntime and the rest of the dev extra (about 0.7 GB of the 3.3 GB .venv), installed by `make test` alone.
$(BIN)/featcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing featcache and its runtime dependencies into $(VENV) (TensorFlow is the big one)"
	$(BIN)/pip install --progress-bar on -e ".[offline]"
	touch $(BIN)/featcache

$(VENV)/.dev-installed: $(BIN)/featcache
	@echo "installing the test tools (the dev extra) into $(VENV)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	touch $(VENV)/.dev-installed

install: $(BIN)/featcache

install-dev: $(VENV)/.dev-installed

demo: install
	$(BIN)/featcache weights install vgg16
	$(BIN)/featcache datasets elpv --dest $(DATA)
	$(BIN)/featcache extract --backbone vgg16 --data $(DATA)
	$(BIN)/featcache fit-head --head dense256 --head logreg --head svm
	$(BIN)/featcache compare --report featcache-out/report.html

test: install-dev
	$(BIN)/ruff check featcache tests scripts
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install-dev
	$(BIN)/ruff check featcache tests scripts

clean:
	rm -rf featcache-out .pytest_cache
