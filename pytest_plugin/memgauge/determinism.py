"""What makes a test's traced figures a function of the test alone, under ``pytest --memprof``.

Four things make a rerun of an unchanged suite move figures, and each has its answer here:

- **The cyclic collector.** When it runs depends on every allocation since the process started,
  so what a test's peak and leaked bytes include depends on what ran before. Before each
  measured test, the collector is settled: what is young is collected (which also empties
  CPython's free lists), the survivors are frozen (``gc.freeze``: later collections do not walk
  them), and its counters start from zero. A full collection of the frozen heap runs between
  tests only once it grew by a quarter, as CPython's own schedule does, so garbage that frozen
  objects become is still reclaimed and the cost stays that of the young heap. The test's own
  young heap is collected again as its scope closes, so its leaked bytes are what is still
  reachable, not whatever cyclic garbage the collector had yet to reach (nor the free lists).
  What stays: a first use measured apart still allocates objects the collector counts, so it
  moves the test's later collections a little (at most one young generation's garbage, a few
  KiB for most code).
- **CPython's attribute cache.** Each slot of the type attribute cache keeps a reference to
  the name it was last looked up by, so a name made at run time (``getattr(obj,
  f"draw_{kind}")``, as hypothesis does for every draw) lives on in the cache after the test.
  From 3.12 the slot is chosen by the name's address, not its hash: which of those strings the
  cache still held moved a hypothesis test's leaked bytes by KiBs from process to process (27
  KiB held in all). The cache is cleared as the test's scope closes, so they are freed there.
  What stays: while the test runs they are its memory, so its peak still moves a little.
- **Randomness.** ``random``, NumPy's global generator and hypothesis are reset to one seed
  before each measured test, as pytest-randomly does (``--memprof-seed``; ``off`` leaves them).
- **First use.** Importing a module for the first time, or compiling a regular expression into
  ``re``'s cache, costs whichever test comes first: another order, subset or xdist worker puts
  it elsewhere. Those stretches are measured apart (a scope whose blocks the test's scope never
  sees) and reported as the test's ``first_use``, not gated with its own figures.
  What stays: CPython's free lists (dicts, tuples, lists, floats) pass blocks across that
  border without calling the allocator. A first use may keep a block the test freed onto them
  (on 3.13 the call of the test function frees pytest's keyword-arguments dict as the test
  starts, and a module imported first makes its dict from it), and the test may take one the
  first use freed: the test's figures move by those blocks, some bytes, in the order where it
  pays. Only a full collection empties the lists; one at each first use would collect the
  test's garbage there, in that order only, and move its peak by far more.

The results file says which of these were in force (``determinism``), and each test what it
paid for first uses.
"""

from __future__ import annotations

import gc
import re
import sys
from typing import Any, Callable

from memgauge._native import Scope

# How many first uses a test's record names; the rest are counted.
NAMED_FIRST_USES = 10

# Clears the type attribute cache (see the module's doc): from 3.13 with the more general
# function, as 3.14 warns that _clear_type_cache is deprecated.
if sys.version_info >= (3, 13):
    clear_type_cache = sys._clear_internal_caches
else:
    clear_type_cache = sys._clear_type_cache


class Collector:
    """The cyclic collector, settled before each measured test (see the module's doc)."""

    def __init__(self) -> None:
        # The objects frozen at the last full collection (None before the first), and those
        # frozen since. Counted as they are frozen: gc.get_freeze_count() walks the whole
        # frozen list (14 ms on a hypothesis suite's heap, every test).
        self.frozen_at_full: int | None = None
        self.frozen_since = 0
        # The thresholds the test found, and the ones it runs with.
        self.thresholds: tuple[int, ...] | None = None
        self.test_thresholds: tuple[int, ...] | None = None

    def settle(self) -> None:
        if self.frozen_at_full is None or self.frozen_since > max(self.frozen_at_full // 4, 10_000):
            gc.unfreeze()
            gc.collect()
            self.frozen_at_full = len(gc.get_objects())
            self.frozen_since = 0
        else:
            gc.collect()
            self.frozen_since += len(gc.get_objects())
        # Freezing also zeroes the young generation's counter (the full collection zeroed the
        # older ones): the test's collections come on its own allocations alone.
        gc.freeze()
        # No automatic full collection inside the test: when one comes depends on the size of
        # the whole heap, which CPython waits to grow by a quarter (and, right after a freeze,
        # would count as empty, making every tenth young collection a full one). The young
        # generations keep their schedule; what survives them is collected as the test ends.
        self.thresholds = gc.get_threshold()
        self.test_thresholds = (*self.thresholds[:2], 2**31 - 1)
        gc.set_threshold(*self.test_thresholds)

    def finish(self) -> None:
        """As a measured test's scope is about to close: its garbage is not its leak, nor the
        attribute names that CPython's type cache still holds."""
        if self.thresholds is not None:
            # A test that set its own thresholds keeps them.
            if gc.get_threshold() == self.test_thresholds:
                gc.set_threshold(*self.thresholds)
            self.thresholds = self.test_thresholds = None
        clear_type_cache()
        gc.collect()

    def close(self) -> None:
        if self.frozen_at_full is not None:
            gc.unfreeze()
            self.frozen_at_full = None


def reseed(seed: int) -> None:
    """``random``, NumPy's global generator and hypothesis, at ``seed``, where imported."""
    random = sys.modules.get("random")
    if random is not None:
        random.seed(seed)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed(seed % 2**32)
    hypothesis_core = sys.modules.get("hypothesis.core")
    # A seed given with --hypothesis-seed is the user's: kept.
    if hypothesis_core is not None and getattr(hypothesis_core, "global_force_seed", 0) is None:
        hypothesis_core.global_force_seed = seed


class FirstUse:
    """Measures first imports and ``re`` cache misses apart from the test that is running.

    Nothing of it may allocate in the test's scope only in the order where the test pays for a
    first use (that would move the test's figures by the bookkeeping): its two scopes are made
    once and reused, and the record is kept while the outer one, apart from the test, is open.
    """

    def __init__(self) -> None:
        # One stretch at a time (an import inside an import is part of it).
        self.depth = 0
        # The running test's first uses: set from begin() to end(), the wrappers' switch.
        self.record: dict[str, Any] | None = None
        self.bookkeeping = Scope(0, apart=True)
        self.measuring = Scope(0)
        self.bootstrap: Any = None
        self.find_and_load: Callable[..., Any] | None = None
        self.re_compile: Callable[..., Any] | None = None

    def install(self) -> None:
        """Wraps ``importlib._bootstrap._find_and_load`` (what every ``import`` of a module not
        in ``sys.modules`` calls, from Python or C) and ``re._compile``."""
        if self.find_and_load is not None:
            return
        bootstrap = sys.modules["_frozen_importlib"]
        self.bootstrap = bootstrap
        self.find_and_load = bootstrap._find_and_load
        self.re_compile = re._compile  # type: ignore[attr-defined]
        find_and_load, re_compile = self.find_and_load, self.re_compile
        # re's caches: one dict before 3.12, two from it.
        cache = re._cache  # type: ignore[attr-defined]
        cache2 = getattr(re, "_cache2", cache)
        regex_flag = re.RegexFlag

        def _find_and_load(name: str, import_: Any) -> Any:
            if self.record is None or self.depth:
                return find_and_load(name, import_)
            return self.apart("import", name, find_and_load, name, import_)

        def _compile(pattern: Any, flags: Any) -> Any:
            if self.record is not None and not self.depth and type(pattern) in (str, bytes):
                key = (
                    type(pattern),
                    pattern,
                    flags.value if isinstance(flags, regex_flag) else flags,
                )
                if key not in cache2 and key not in cache:
                    return self.apart("re.compile", pattern, re_compile, pattern, flags)
            return re_compile(pattern, flags)

        bootstrap._find_and_load = _find_and_load
        re._compile = _compile  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self.find_and_load is None:
            return
        self.bootstrap._find_and_load = self.find_and_load
        re._compile = self.re_compile  # type: ignore[attr-defined]
        self.find_and_load = self.re_compile = None

    def apart(self, kind: str, subject: Any, function: Callable[..., Any], *args: Any) -> Any:
        bookkeeping, measuring = self.bookkeeping, self.measuring
        try:
            bookkeeping.start()
        except RuntimeError:
            return function(*args)
        self.depth = 1
        try:
            measuring.start()
            try:
                return function(*args)
            finally:
                measuring.stop()
                self.add(kind, subject)
        finally:
            self.depth = 0
            bookkeeping.stop()

    def add(self, kind: str, subject: Any) -> None:
        record, measured = self.record, self.measuring
        if record is None:
            return
        # The most the first uses held at once, had nothing else run: each one's peak above
        # what the earlier ones still hold.
        held = record["leaked_bytes"]
        record["peak_bytes"] = max(record["peak_bytes"], held + measured.peak_bytes)
        record["leaked_bytes"] = held + measured.leaked_bytes
        record["allocated_bytes"] += measured.allocated_bytes
        record["allocations"] += measured.allocations
        record["count"] += 1
        if len(record["what"]) < NAMED_FIRST_USES:
            record["what"].append(
                f"import {subject}" if kind == "import" else f"{kind}({subject!r:.60})"
            )

    def begin(self) -> None:
        """From here to :meth:`end`, first uses are measured apart."""
        self.record = {
            "peak_bytes": 0,
            "leaked_bytes": 0,
            "allocated_bytes": 0,
            "allocations": 0,
            "count": 0,
            "what": [],
        }

    def end(self) -> dict[str, Any] | None:
        """The test's scope is about to close: what its first uses cost, if it had any."""
        record, self.record = self.record, None
        return record if record and record["count"] else None


class Determinism:
    """The collector, the seeds and the first uses, around each measured test."""

    def __init__(self, seed: int | None, randomly: bool) -> None:
        self.seed = seed
        self.randomly = randomly
        self.collector = Collector()
        self.first_use = FirstUse()

    def describe(self) -> dict[str, Any]:
        """For the results file: what each figure includes."""
        seeds: Any = self.seed
        if self.randomly:
            seeds = "pytest-randomly"
        return {
            "gc": "settled before each test (young collected, the rest frozen), "
            "collected at its end (leaked: still reachable)",
            "seed": seeds,
            "first_use": "imports and re cache misses, reported apart (first_use), not gated",
        }

    def before(self) -> None:
        """Just before a test's scope opens (its first uses are measured apart from here)."""
        self.collector.settle()
        if self.seed is not None:
            reseed(self.seed)
        self.first_use.install()
        self.first_use.begin()

    def after(self) -> dict[str, Any] | None:
        """Just before a test's scope closes: what its first uses cost, if it had any."""
        self.collector.finish()
        return self.first_use.end()

    def close(self) -> None:
        self.first_use.uninstall()
        self.collector.close()
