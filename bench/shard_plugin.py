"""A pytest plugin that bench/suites.py loads into every run it times (``-p shard_plugin``).

- ``MEMGAUGE_BENCH_RANGE=start:stop`` keeps only the collected tests ``start`` to ``stop - 1``
  (in collection order), so a suite can run as short shards;
- ``MEMGAUGE_BENCH_OUT=path`` receives, as JSON, the seconds from the end of collection to the
  end of the session (``session_s``: the part of a run where the modes differ: every test, and
  each plugin's session-end work such as writing its results) and each test's seconds
  (``tests_s``, setup to teardown, in order: what the shards are cut by).
"""

from __future__ import annotations

import json
import os
import time

import pytest

_timings: dict = {"tests_s": []}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = os.environ.get("MEMGAUGE_BENCH_RANGE")
    if not selected:
        return
    start, stop = (int(bound) for bound in selected.split(":"))
    config.hook.pytest_deselected(items=items[:start] + items[stop:])
    items[:] = items[start:stop]


def pytest_collection_finish(session: pytest.Session) -> None:
    _timings["start"] = time.perf_counter()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _timings["tests_s"].append(time.perf_counter() - start)


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    out = os.environ.get("MEMGAUGE_BENCH_OUT")
    if not out or "start" not in _timings:
        return
    session_s = time.perf_counter() - _timings["start"]
    with open(out, "w", encoding="utf-8") as file:
        json.dump({"session_s": session_s, "tests_s": _timings["tests_s"]}, file)
