"""Line profiling overhead: memgauge's line profiler vs memory_profiler's, in two cases.

Run: python bench/lines.py [--rounds 5] [--n 100000]

The allocation-heavy function of bench/engine.py runs plain, under memgauge.LineProfiler (from
3.12 once with its line events from sys.monitoring and once from the trace function) and under
memory_profiler's LineProfiler (when installed: `pip install memory_profiler`; it breaks on
3.12+), interleaved so machine noise hits all alike; each table shows medians and each one's
ratio to the plain run. Two cases: the function itself profiled, and a profiled caller of it
(see CASES). Targets: memgauge at most 3x plain (issue 5); from 3.12, at most 1.5x (issue 23),
which the traced figures alone exceed on this workload (`memgauge.measure()` around it costs
about 1.55x on 3.13: it allocates on every line).
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


def drive(n: int) -> int:
    """A profiled function whose time goes to code that is not profiled (workload)."""
    return workload(n)


# The two cases: every line run is a profiled one (the trace function's best case, and the
# worst for sys.monitoring, which costs more per line event on 3.13), and a profiled caller of
# code that is not profiled (a library): the trace function is still called for every line of
# it, sys.monitoring not at all.
CASES = {"lines of the profiled function": workload, "a profiled caller of other code": drive}


def runners_for(target, peer: bool) -> dict:
    @contextlib.contextmanager
    def plain():
        yield target

    def memgauge_runner(events: str):
        @contextlib.contextmanager
        def with_memgauge():
            profiler = memgauge.LineProfiler(target, events=events)
            with profiler:
                yield target

        return with_memgauge

    # From 3.12 memgauge takes its line events from sys.monitoring; the trace function beside.
    runners = {"plain": plain}
    if sys.version_info >= (3, 12):
        runners["memgauge (sys.monitoring)"] = memgauge_runner("auto")
        runners["memgauge (settrace)"] = memgauge_runner("settrace")
    else:
        runners["memgauge"] = memgauge_runner("auto")
    if peer:
        from memory_profiler import LineProfiler

        @contextlib.contextmanager
        def with_memory_profiler():
            profiler = LineProfiler()
            yield profiler(target)

        runners["memory_profiler"] = with_memory_profiler
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--no-peer", action="store_true", help="skip memory_profiler (slow)")
    args = parser.parse_args()

    peer = False
    if not args.no_peer:
        try:
            import memory_profiler  # noqa: F401

            peer = True
        except ImportError:
            print("memory_profiler not installed: pip install memory_profiler")

    workload(args.n // 10)  # warm up
    for case, target in CASES.items():
        runners = runners_for(target, peer)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                with runner() as function:
                    start = time.perf_counter()
                    function(args.n)
                    times[name].append(time.perf_counter() - start)
        title = f"{case}, workload({args.n}): {args.rounds} interleaved rounds, medians"
        print_ratios(title, times)
        print()


if __name__ == "__main__":
    main()
