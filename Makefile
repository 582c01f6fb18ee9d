PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLOORS_VENV := .venv-floors

.PHONY: test test-floors demo lint install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The fast tests (not marked slow) against the lowest declared version of
# every direct dependency (pyproject.toml: dependencies and the dev extra).
test-floors: $(STAMP)
	$(BIN)/python .ci/floors.py --venv $(FLOORS_VENV)

demo: $(STAMP)
	$(BIN)/mlx-provider demo

clean:
	rm -rf $(VENV) $(FLOORS_VENV) .pytest_cache build *.egg-info
