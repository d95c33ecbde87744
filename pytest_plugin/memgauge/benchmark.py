"""The ``memit`` fixture: memory benchmarks inside tests, gated by ``memgauge compare``.

::

    def test_build(memit):
        index = memit(build_index, data, rounds=5)

``memit(fn, *args, rounds=5, name=None, leak_per_round=None, **kwargs)`` calls ``fn`` once to
warm up (caches, lazy imports) and returns that call's result; then it measures ``rounds``
more calls and records the median traced peak, leaked bytes (what a call still holds when it
returns, its result included) and allocations. Each ``memit`` call is stored in the results
file's ``"benchmarks"`` section under ``<test id>::<name>`` (``name`` defaults to the callable's
name), which ``memgauge compare`` gates like a test.

``leak_per_round="1 KiB"`` fails the test when the memory retained across rounds grows by more
than that per round: rounds after the first run inside one more scope, each round's result is
dropped before the next, and what that scope still holds at the end, divided by the rounds,
is the growth per round. The failure names the lines that hold it.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Callable

import pytest

import memgauge
from memgauge.config import posix_path

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _median(values: list[int]) -> int:
    return int(statistics.median_low(values))


class Memit:
    def __init__(self, item: pytest.Item, records: list[dict[str, Any]]) -> None:
        self.item = item
        self.records = records

    def __call__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        rounds: int = 5,
        name: str | None = None,
        leak_per_round: str | int | None = None,
        **kwargs: Any,
    ) -> Any:
        if rounds < 1:
            raise ValueError(f"memit: rounds must be at least 1, not {rounds}")
        allowance = None
        if leak_per_round is not None:
            allowance = (
                memgauge.parse_size(leak_per_round)
                if isinstance(leak_per_round, str)
                else int(leak_per_round)
            )
            if rounds < 2:
                raise ValueError("memit: leak_per_round needs rounds >= 2 to see growth")
        label = name or getattr(fn, "__name__", type(fn).__name__)
        key = f"{self.item.nodeid}::{label}"
        if any(record["id"] == key for record in self.records):
            raise ValueError(
                f"memit: {key} is already recorded in this test; pass name= to tell calls apart"
            )

        result = fn(*args, **kwargs)
        # Everything the rounds need exists before the growth scope opens, and the figures are
        # read after it closes, so the machinery holds nothing inside it.
        scopes = [memgauge.measure(top_sites=5) for _ in range(rounds)]
        growth = memgauge.measure(top_sites=5) if allowance is not None else None
        for round_number, scope in enumerate(scopes):
            if round_number == 1 and growth is not None:
                growth.start()
            scope.start()
            value = fn(*args, **kwargs)
            scope.stop()
            del value
        if growth is not None:
            growth.stop()
        peaks = [scope.peak_bytes for scope in scopes]
        leaks = [scope.leaked_bytes for scope in scopes]
        allocations = [scope.allocations for scope in scopes]
        allocated = [scope.allocated_bytes for scope in scopes]

        file, line, _ = self.item.location
        self.records.append(
            {
                "id": key,
                "file": posix_path(file),
                "line": (line or 0) + 1,
                "rounds": rounds,
                "peak_bytes": _median(peaks),
                "leaked_bytes": _median(leaks),
                "allocations": _median(allocations),
                "allocated_bytes": _median(allocated),
            }
        )
        if growth is not None and allowance is not None:
            per_round = growth.leaked_bytes / (rounds - 1)
            if per_round > allowance:
                lines = [
                    f"memit {key}: the memory retained grew by "
                    f"{memgauge.format_size(round(per_round))} per round over {rounds - 1} "
                    f"rounds (allowed {memgauge.format_size(allowance)} per round)."
                ]
                sites = [s for s in growth.leak_sites if not s["file"].startswith(PACKAGE_DIR)]
                if sites:
                    lines.append("Lines holding the growth:")
                    lines += [
                        f"  {s['file']}:{s['line']} {s['function']}: "
                        f"{memgauge.format_size(s['bytes'])}"
                        for s in sites
                    ]
                pytest.fail("\n".join(lines), pytrace=False)
        return result
