"""pytest --memprof on real third-party suites, against plain pytest and pytest --memray.

Run: python bench/suites.py [--rounds 5]

Suites: more-itertools from its sdist (pure Python; downloaded from PyPI) and NumPy's own
installed tests (numpy.linalg and numpy.fft; NumPy's conftest needs hypothesis). Each round runs
every suite plain, with --memprof and with --memray (pytest-memray, when installed),
interleaved; the table shows median wall times and the ratio to plain. Target (issue 3):
--memprof at most 1.15x plain on each suite, and below pytest-memray.

On a shared VM, plain runs of the same suite vary by 10-30% in wall time from one minute to
the next, so a round is a paired comparison: its runs follow each other, in an order that
rotates from round to round (a slow spell does not always hit the same mode), with one hash
seed for all of them (PYTHONHASHSEED = the round's number: the seed moves a run's time too).
The table shows, per mode, the median wall time, the ratio of medians, and the median of the
rounds' own ratios (each run against the plain run of its round), which a slow spell moves
least; and the CPU time (user + system, from the kernel's accounting of finished children),
which shows whether a difference was work or waiting.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def children_cpu() -> float:
    """User and system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
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
        cpu = {(suite, mode): [] for suite in suites for mode in MODES}
        modes = list(MODES)
        for round_ in range(args.rounds):
            order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
            for suite, (targets, cwd, env) in suites.items():
                seen = []
                for mode in order:
                    command = [
                        sys.executable,
                        "-m",
                        "pytest",
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        *MODES[mode],
                        *targets,
                    ]
                    run_env = {**os.environ, **env, "PYTHONHASHSEED": str(round_)}
                    cpu_before = children_cpu()
                    start = time.perf_counter()
                    done = subprocess.run(
                        command, cwd=cwd, env=run_env, capture_output=True, text=True
                    )
                    times[(suite, mode)].append(time.perf_counter() - start)
                    cpu[(suite, mode)].append(children_cpu() - cpu_before)
                    seen.append(f"{mode} {times[(suite, mode)][-1]:.1f}s")
                    if done.returncode not in (0, 1):
                        print(f"{suite} {mode}: pytest exited {done.returncode}")
                        print(done.stdout[-2000:], done.stderr[-2000:])
                print(f"round {round_ + 1}, {suite}: " + ", ".join(seen), flush=True)

    print(f"\nmedians of {args.rounds} interleaved rounds")
    header = (
        f"{'suite':<20} {'mode':<10} {'wall s':>8} {'ratio':>7} {'paired':>7}"
        f" {'cpu s':>8} {'ratio':>7}"
    )
    print(header)
    for suite in suites:
        base = statistics.median(times[(suite, "plain")])
        cpu_base = statistics.median(cpu[(suite, "plain")])
        for mode in MODES:
            median = statistics.median(times[(suite, mode)])
            paired = statistics.median(
                run / plain for run, plain in zip(times[(suite, mode)], times[(suite, "plain")])
            )
            cpu_median = statistics.median(cpu[(suite, mode)])
            print(
                f"{suite:<20} {mode:<10} {median:>8.2f} {median / base:>6.2f}x {paired:>6.2f}x"
                f" {cpu_median:>8.2f} {cpu_median / cpu_base:>6.2f}x"
            )


if __name__ == "__main__":
    main()
