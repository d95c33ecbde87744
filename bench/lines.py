"""Line profiling overhead: memgauge's line profiler vs memory_profiler's, on one function.

Run: python bench/lines.py [--rounds 5] [--n 100000]

The allocation-heavy function of bench/engine.py runs plain, under memgauge.LineProfiler and
under memory_profiler's LineProfiler (when installed: `pip install memory_profiler`), interleaved
so machine noise hits all alike; the table shows medians and each one's ratio to the plain run.
Target (issue 5): memgauge at most 3x plain.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memgauge
from engine import print_ratios, workload


@contextlib.contextmanager
def plain():
    yield workload


@contextlib.contextmanager
def with_memgauge():
    profiler = memgauge.LineProfiler(workload)
    with profiler:
        yield workload


def memory_profiler_runner():
    try:
        from memory_profiler import LineProfiler
    except ImportError:
        return None

    @contextlib.contextmanager
    def with_memory_profiler():
        profiler = LineProfiler()
        yield profiler(workload)

    return with_memory_profiler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--no-peer", action="store_true", help="skip memory_profiler (slow)")
    args = parser.parse_args()

    runners = {"plain": plain, "memgauge": with_memgauge}
    peer = None if args.no_peer else memory_profiler_runner()
    if peer is not None:
        runners["memory_profiler"] = peer
    elif not args.no_peer:
        print("memory_profiler not installed: pip install memory_profiler")

    times: dict[str, list[float]] = {name: [] for name in runners}
    workload(args.n // 10)  # warm up
    for _ in range(args.rounds):
        for name, runner in runners.items():
            with runner() as function:
                start = time.perf_counter()
                function(args.n)
                times[name].append(time.perf_counter() - start)

    title = f"line profile of workload({args.n}): {args.rounds} interleaved rounds, medians"
    print_ratios(title, times)


if __name__ == "__main__":
    main()
