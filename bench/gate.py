"""Gate speed: `memgauge compare` of 100,000 tests against a 100,000-test baseline.

Run: python bench/gate.py [--tests 100000]

Builds the standalone binary (cargo build --release --bin memgauge), writes synthetic results and
a baseline (5% of the tests regress), and prints the wall time and peak RSS of the comparison,
median of 5 runs. Targets: under 0.5 s and under 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def synthetic(n: int, grow_every: int | None) -> dict:
    tests = {}
    for i in range(n):
        peak = 1_000_000 + (i % 1000) * 4096
        if grow_every and i % grow_every == 0:
            peak *= 2
        tests[f"tests/test_mod{i // 100}.py::test_case[{i}]"] = {
            "outcome": "passed",
            "file": f"tests/test_mod{i // 100}.py",
            "line": 10 + i % 100,
            "peak_bytes": peak,
            "leaked_bytes": i % 7,
            "allocated_bytes": peak * 2,
            "allocations": 100 + i % 50,
            "rss_peak_bytes": peak,
            "rss_delta_bytes": 0,
            "duration_s": 0.001,
            "top_sites": [
                {"file": f"tests/test_mod{i // 100}.py", "line": 11, "function": "f", "bytes": peak}
            ],
        }
    return {"schema": 1, "tool": {"name": "memgauge"}, "environment": {}, "tests": tests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tests", type=int, default=100_000)
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        (args.write / "base.json").write_text(json.dumps(synthetic(args.tests, None)))
        (args.write / "now.json").write_text(json.dumps(synthetic(args.tests, 20)))
        return
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "--bin", "memgauge"], cwd=ROOT, check=True
    )
    binary = ROOT / "target" / "release" / "memgauge"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Written by a child, so this process stays small: the comparison's peak RSS comes from
        # wait4, and a child's maxrss starts from the memory of the process that spawned it.
        subprocess.run(
            [sys.executable, __file__, "--write", str(work), "--tests", str(args.tests)],
            check=True,
        )
        subprocess.run(
            [binary, "baseline", "update", "base.json", "--baseline", "b.toml"],
            cwd=work,
            check=True,
            capture_output=True,
        )
        times, peaks = [], []
        for _ in range(5):
            start = time.perf_counter()
            child = subprocess.Popen(
                [binary, "compare", "now.json", "--baseline", "b.toml", "--junit", "j.xml"],
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            # wait4: this child's own peak RSS (RUSAGE_CHILDREN would include cargo's).
            _, status, usage = os.wait4(child.pid, 0)
            times.append(time.perf_counter() - start)
            peaks.append(usage.ru_maxrss)
            assert os.waitstatus_to_exitcode(status) == 1, child.stderr.read()
            child.stderr.close()
        size_mb = (work / "now.json").stat().st_size / 1e6
        print(f"compare {args.tests} tests ({size_mb:.0f} MB results) against {args.tests}")
        print(f"wall time: median {statistics.median(times):.3f} s (target < 0.5 s)")
        print(f"peak RSS: {max(peaks) / 1024:.0f} MB (target < 200 MB; max over runs)")


if __name__ == "__main__":
    main()
