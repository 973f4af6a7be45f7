# The two commands a newcomer needs: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= data/demo

.PHONY: install demo test lint clean

$(BIN)/featcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/featcache

install: $(BIN)/featcache

demo: install
	$(BIN)/python scripts/make_demo_data.py --dest $(DATA)
	$(BIN)/featcache extract --backbone vgg16 --data $(DATA)
	$(BIN)/featcache info

test: install
	$(BIN)/ruff check featcache tests scripts
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check featcache tests scripts

clean:
	rm -rf featcache-out .pytest_cache
