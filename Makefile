# One entry point: the README, CI and .ci/run call these targets.
PYTHON ?= python3

.PHONY: install test lint demo bench

install:
	$(PYTHON) -m pip install --quiet -e ".[test]"

# Every test: Rust unit and integration tests, the Python suite, and the linters.
test: install lint
	cargo test --quiet
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	cargo fmt --all -- --check
	cargo clippy --quiet --all-targets -- -D warnings
	cargo clippy --quiet --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check pytest_plugin tests bench examples
	$(PYTHON) -m ruff format --check pytest_plugin tests bench examples

# The main job on the example suite: measure every test, then gate against the committed baseline.
demo: install
	cd examples && $(PYTHON) -m pytest --memprof -q && memgauge compare

# Benchmarks: run by hand, figures go in the notes (they print ratios, not pass/fail).
bench: install
	$(PYTHON) -m pip install --quiet -e ".[bench]"
	$(PYTHON) bench/engine.py
	$(PYTHON) bench/gate.py
	$(PYTHON) bench/lines.py
	$(PYTHON) bench/run.py
