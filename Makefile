# One entry point: the README, CI and .ci/run call these targets.
PYTHON ?= python3

.PHONY: install native wheel browser test test-debug lint check-platforms demo bench versions

install:
	$(PYTHON) -m pip install --quiet -e ".[test]"

# Rebuilds only the extension, as maturin builds it (a cdylib alone: `cargo build` also makes
# the rlib, which keeps the crate's symbols exported and the hooks' calls indirect), where the
# editable install (`make install`) looks for it. For measuring changes to the engine.
native:
	cargo rustc --quiet --release --features python --lib --crate-type cdylib
	cp target/release/libmemgauge.so \
	  pytest_plugin/memgauge/_native$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

# The Linux wheel, as `pip install memgauge` would get it: built with debug info stripped, its
# manylinux tag checked by auditwheel, its size and contents printed; and the sdist, both
# checked by twine (release.yml builds a wheel from the sdist alone). tests/test_wheel.py
# installs it into a fresh virtual environment with no Rust on PATH. Its own target directory:
# the stripped build would otherwise rebuild, and be rebuilt by, the editable install.
wheel:
	rm -rf dist
	CARGO_TARGET_DIR=target/wheel $(PYTHON) -m maturin build --quiet --release --strip --out dist
	$(PYTHON) -m maturin sdist --out dist
	$(PYTHON) -m pip install --quiet "auditwheel>=6" "twine>=5"
	$(PYTHON) -m auditwheel show dist/*.whl
	$(PYTHON) -m twine check --strict dist/*.whl dist/*.tar.gz
	@$(PYTHON) -c 'import glob, os, zipfile; w = glob.glob("dist/*.whl")[0]; \
	  print(f"{w}: {os.path.getsize(w) / 2**20:.2f} MiB"); \
	  [print(f"  {i.file_size:>10}  {i.filename}") for i in zipfile.ZipFile(w).infolist()]'

# Headless Chromium (Debian's package) for the HTML report's browser test.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && { \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "memgauge: could not install chromium (needs root and apt-get)"

# Every test: Rust unit and integration tests, the Python suite, and the linters.
test: install wheel browser lint
	cargo test --quiet
	MEMGAUGE_REQUIRE_BROWSER=1 $(PYTHON) -m pytest -q -p no:cacheprovider

# The engine's tests against a debug build of the extension, so that its debug_assert!s run
# (the release build and `cargo test`, without the Python feature, skip them). A copy of the
# package with the debug build goes first on PYTHONPATH; the editable install is left alone.
# Slower than `make test`, and not part of it: CI runs it as a job of its own.
DEBUG_PACKAGE := target/debug-package
test-debug: install
	cargo rustc --quiet --features python --lib --crate-type cdylib
	rm -rf $(DEBUG_PACKAGE) && mkdir -p $(DEBUG_PACKAGE)
	cp -r pytest_plugin/memgauge $(DEBUG_PACKAGE)/
	rm -f $(DEBUG_PACKAGE)/memgauge/_native*.so
	cp target/debug/libmemgauge.so \
	  $(DEBUG_PACKAGE)/memgauge/_native$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
	PYTHONPATH=$(DEBUG_PACKAGE) $(PYTHON) -c 'import memgauge, sys; assert "$(DEBUG_PACKAGE)" in memgauge.__file__, memgauge.__file__'
	PYTHONPATH=$(DEBUG_PACKAGE) $(PYTHON) -m pytest -q -p no:cacheprovider \
	  tests/test_engine.py tests/test_profile.py tests/test_determinism.py tests/test_plugin.py \
	  tests/test_native.py

lint: check-platforms
	cargo fmt --all -- --check
	cargo clippy --quiet --all-targets -- -D warnings
	cargo clippy --quiet --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check pytest_plugin tests bench examples
	$(PYTHON) -m ruff format --check pytest_plugin tests bench examples
	$(PYTHON) -m mypy.stubtest memgauge._native --allowlist tests/stubtest_allowlist.txt

# The code for macOS and Windows, compile-checked from Linux (clippy, both feature sets; PyO3 is
# told the Python version instead of running one). CI runs the suite there too (ci.yml). Where
# rustup cannot add the two targets (no network), it says so and checks nothing.
PLATFORM_TARGETS := x86_64-apple-darwin x86_64-pc-windows-msvc
check-platforms:
	@if rustup target add $(PLATFORM_TARGETS) >/dev/null 2>&1; then \
	  for target in $(PLATFORM_TARGETS); do \
	    cargo clippy --quiet --target $$target --all-targets -- -D warnings && \
	    PYO3_CROSS_PYTHON_VERSION=3.11 cargo clippy --quiet --target $$target --features python \
	      --lib -- -D warnings || exit 1; \
	  done; \
	else echo "memgauge: rustup could not add $(PLATFORM_TARGETS): macOS and Windows code not checked"; fi

# The main job on the example suite: measure every test, then gate against the committed baseline.
demo: install
	cd examples && $(PYTHON) -m pytest --memprof -q && memgauge compare

# Benchmarks: run by hand, figures go in the notes (they print ratios, not pass/fail).
bench: install
	$(PYTHON) -m pip install --quiet -e ".[bench]"
	$(PYTHON) bench/engine.py
	$(PYTHON) bench/hook_instructions.py
	$(PYTHON) bench/gate.py
	$(PYTHON) bench/lines.py
	$(PYTHON) bench/run.py
	$(PYTHON) bench/suites.py
	$(PYTHON) bench/determinism.py

# The Python suite on CPython 3.9, 3.13, 3.14 and 3.15 in Debian chroots (root, debootstrap, network):
# the versions this machine lacks. By hand; not part of `make test`.
versions:
	.ci/versions
