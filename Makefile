# The two commands a newcomer needs: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= data/elpv

.PHONY: install demo test lint clean

$(BIN)/featcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing featcache and its dependencies into $(VENV) (TensorFlow is the big one)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	touch $(BIN)/featcache

install: $(BIN)/featcache

demo: install
	$(BIN)/featcache weights install vgg16
	$(BIN)/featcache datasets elpv --dest $(DATA)
	$(BIN)/featcache extract --backbone vgg16 --data $(DATA)
	$(BIN)/featcache fit-head --head dense256 --head logreg --head svm
	$(BIN)/featcache compare --report featcache-out/report.html

test: install
	$(BIN)/ruff check featcache tests scripts
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check featcache tests scripts

clean:
	rm -rf featcache-out .pytest_cache
