"""pytest --memprof on real third-party suites, against plain pytest and pytest --memray.

Run: python bench/suites.py [--rounds 3]

Suites: more-itertools from its sdist (pure Python; downloaded from PyPI) and NumPy's own
installed tests (numpy.linalg and numpy.fft; NumPy's conftest needs hypothesis). Each round runs
every suite plain, with --memprof and with --memray (pytest-memray, when installed),
interleaved; the table shows median wall times and the ratio to plain. Target (issue 3):
--memprof at most 1.15x plain on each suite, and below pytest-memray.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def more_itertools(work: Path) -> tuple[list[str], Path, dict[str, str]]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "more-itertools",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-q",
            "-d",
            str(work),
        ],
        check=True,
    )
    sdist = next(work.glob("more_itertools-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    root = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith("more_itertools-"))
    return ["tests"], root, {"PYTHONPATH": str(root)}


def numpy_tests(work: Path) -> tuple[list[str], Path, dict[str, str]]:
    return ["--pyargs", "numpy.linalg", "numpy.fft"], work, {}


MODES = {"plain": [], "memgauge": ["--memprof"], "memray": ["--memray"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import pytest_memray  # noqa: F401
    except ImportError:
        del MODES["memray"]
        print("pytest-memray not installed: pip install -e '.[bench]'")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        suites = {"more-itertools": more_itertools(work), "numpy linalg+fft": numpy_tests(work)}
        times = {(suite, mode): [] for suite in suites for mode in MODES}
        for _ in range(args.rounds):
            for suite, (targets, cwd, env) in suites.items():
                for mode, flags in MODES.items():
                    command = [
                        sys.executable,
                        "-m",
                        "pytest",
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        *flags,
                        *targets,
                    ]
                    start = time.perf_counter()
                    done = subprocess.run(
                        command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
                    )
                    times[(suite, mode)].append(time.perf_counter() - start)
                    if done.returncode not in (0, 1):
                        print(f"{suite} {mode}: pytest exited {done.returncode}")
                        print(done.stdout[-2000:], done.stderr[-2000:])

    print(f"\nwall time, median of {args.rounds} interleaved rounds")
    print(f"{'suite':<20} {'mode':<10} {'median s':>9} {'ratio':>7}")
    for suite in suites:
        base = statistics.median(times[(suite, "plain")])
        for mode in MODES:
            median = statistics.median(times[(suite, mode)])
            print(f"{suite:<20} {mode:<10} {median:>9.2f} {median / base:>6.2f}x")


if __name__ == "__main__":
    main()
