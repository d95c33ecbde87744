"""Engine overhead on an allocation-heavy workload: memgauge vs tracemalloc vs memray.

Run: python bench/engine.py [--rounds 7]

Each round runs the workload plain, under memgauge.measure(), under tracemalloc, and under
memray.Tracker (when installed), interleaved so machine noise hits all alike; the table shows
medians and each tool's ratio to the plain run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import tracemalloc

import memgauge


def workload(n: int = 300_000) -> int:
    """Hundreds of thousands of small dicts, strings and tuples, most of them short-lived."""
    kept = []
    total = 0
    for i in range(n):
        record = {"id": i, "name": "item-" + str(i), "pair": (i, i * 2)}
        text = record["name"].upper()
        total += len(text) + len(record)
        if i % 10 == 0:
            kept.append((record, text))
    return total + len(kept)


@contextlib.contextmanager
def plain():
    yield


@contextlib.contextmanager
def with_memgauge():
    with memgauge.measure():
        yield


@contextlib.contextmanager
def with_tracemalloc():
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def memray_runner():
    try:
        import memray
    except ImportError:
        return None

    @contextlib.contextmanager
    def with_memray():
        with tempfile.TemporaryDirectory() as tmp:
            with memray.Tracker(os.path.join(tmp, "out.bin")):
                yield

    return with_memray


def print_ratios(title: str, times: dict[str, list[float]]) -> None:
    """Median time of each tool and its ratio to the "plain" run."""
    base = statistics.median(times["plain"])
    width = max(map(len, times)) + 2
    print(title)
    print(f"{'tool':<{width}} {'median s':>9} {'ratio':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<{width}} {median:>9.3f} {median / base:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=300_000)
    args = parser.parse_args()

    runners = {"plain": plain, "memgauge": with_memgauge, "tracemalloc": with_tracemalloc}
    memray_cm = memray_runner()
    if memray_cm is not None:
        runners["memray"] = memray_cm

    times: dict[str, list[float]] = {name: [] for name in runners}
    workload(args.n // 10)  # warm up
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            with runner():
                workload(args.n)
            times[name].append(time.perf_counter() - start)

    print_ratios(f"workload: {args.n} records, {args.rounds} interleaved rounds, medians", times)


if __name__ == "__main__":
    main()
