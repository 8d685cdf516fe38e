# The two commands a newcomer needs: `make demo` and `make test`. Each builds the venv it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint compose-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# One resolver pass over pyproject: installing packages one by one breaks the click pin.
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/istream demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

compose-check:
	./scripts/system-deps.sh
	docker-compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.yml --profile cuda config -q
	@echo "docker-compose.yml is valid"

test: $(STAMP) lint compose-check
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	@ls bench/*.py | xargs -n1 echo "run: $(BIN)/python"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
