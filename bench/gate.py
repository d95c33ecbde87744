"""Gate speed: `memgauge compare` of 100,000 tests against a 100,000-test baseline, and a
matrix: `baseline update` of 20 environments x 10,000 tests, and `compare` of one of them.

Run: python bench/gate.py [--tests 100000] [--environments 20 --matrix-tests 10000]

Builds the standalone binary (cargo build --release --bin memgauge), writes synthetic results and
baselines (5% of the tests regress), and prints the wall time and peak RSS of each command,
median of 5 runs. Targets: compare of 100,000 under 0.5 s and 200 MB; the matrix's update and
compare each under 1 s.
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


def synthetic(n: int, grow_every: int | None, environment: str | None = None) -> dict:
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
    env = {"key": environment} if environment else {}
    return {"schema": 1, "tool": {"name": "memgauge"}, "environment": env, "tests": tests}


def environments(count: int) -> list[str]:
    """cp39..cp314 x linux/darwin x x86_64/arm64, as many as asked."""
    keys = [
        f"cp3{minor}{t}-{platform}-{machine}"
        for t in ("", "t")
        for platform in ("linux", "darwin")
        for machine in ("x86_64", "arm64")
        for minor in range(9, 15)
    ]
    return keys[:count]


def timed(binary: Path, args: list[str], cwd: Path, expect: int, rounds: int = 5):
    """Median wall time and max peak RSS (MB) of `binary args` over `rounds` runs."""
    times, peaks = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        child = subprocess.Popen(
            [binary, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # wait4: this child's own peak RSS (RUSAGE_CHILDREN would include cargo's).
        _, status, usage = os.wait4(child.pid, 0)
        times.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss)
        assert os.waitstatus_to_exitcode(status) == expect, child.stderr.read()
        child.stderr.close()
    return statistics.median(times), max(peaks) / 1024


def matrix(binary: Path, work: Path, count: int, tests: int) -> None:
    keys = environments(count)
    files = [f"m{index}.json" for index in range(len(keys))]
    subprocess.run(
        [binary, "baseline", "update", *files, "--baseline", "matrix.toml"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    size_mb = (work / "matrix.toml").stat().st_size / 1e6
    print(f"\nmatrix: {len(keys)} environments x {tests} tests ({size_mb:.0f} MB baseline)")
    # Each round starts from the same baseline: one environment's tests, 5% of them grown.
    pristine = (work / "matrix.toml").read_bytes()
    times, peaks = [], []
    for _ in range(5):
        (work / "matrix.toml").write_bytes(pristine)
        seconds, peak = timed(
            binary,
            ["baseline", "update", *files[1:], "grown.json", "--baseline", "matrix.toml"],
            work,
            0,
            rounds=1,
        )
        times.append(seconds)
        peaks.append(peak)
    print(
        f"baseline update of all {len(keys)} (one environment changed): median "
        f"{statistics.median(times):.3f} s (target < 1 s), peak RSS {max(peaks):.0f} MB"
    )
    (work / "matrix.toml").write_bytes(pristine)
    seconds, peak = timed(binary, ["compare", "grown.json", "--baseline", "matrix.toml"], work, 1)
    print(
        f"compare of one environment against all {len(keys)}: median {seconds:.3f} s "
        f"(target < 1 s), peak RSS {peak:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tests", type=int, default=100_000)
    parser.add_argument("--environments", type=int, default=20)
    parser.add_argument("--matrix-tests", type=int, default=10_000)
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        # By the plugin's writer, in its layout, as the gate reads it in CI.
        from memgauge._native import ResultsWriter

        def write(name: str, document: dict) -> None:
            path = str(args.write / name)
            writer = ResultsWriter(path, json.dumps(document["environment"]))
            for key, record in document["tests"].items():
                writer.test(key, json.dumps(record))
            writer.finish(json.dumps(document["tool"]), "{}")

        write("base.json", synthetic(args.tests, None))
        write("now.json", synthetic(args.tests, 20))
        keys = environments(args.environments)
        for index, key in enumerate(keys):
            write(f"m{index}.json", synthetic(args.matrix_tests, None, key))
        write("grown.json", synthetic(args.matrix_tests, 20, keys[0]))
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
            [
                sys.executable,
                __file__,
                "--write",
                str(work),
                "--tests",
                str(args.tests),
                "--environments",
                str(args.environments),
                "--matrix-tests",
                str(args.matrix_tests),
            ],
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
        matrix(binary, work, args.environments, args.matrix_tests)


if __name__ == "__main__":
    main()
