"""pytest --memprof on real third-party suites, against plain pytest and pytest --memray.

Run: python bench/suites.py [--rounds 5]
     python bench/suites.py --instructions   (once per suite and mode, under cachegrind)

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
least; the ratio of the fastest runs ("best": noise only ever adds time, so each mode's
fastest run is its closest to undisturbed); and the CPU time (user + system, from the
kernel's accounting of finished children), which shows whether a difference was work or
waiting.

`--instructions` counts instead: each suite runs once per mode under valgrind's cachegrind
(Debian: `apt install valgrind`), two at a time, and the table shows the instructions each run
executed. A count does not move with the VM, so it is the figure to compare changes by; it is
not time (the hooks' instructions run faster than the interpreter's average). NumPy's BLAS
runs one thread there (OPENBLAS_NUM_THREADS=1), and a few of its tests fail under valgrind's
floating point emulation, the same tests in every mode.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
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


def pytest_command(mode: str, targets: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODES[mode], *targets]


def count_instructions(suites: dict[str, tuple[list[str], Path, dict[str, str]]]) -> None:
    """Each suite once per mode under cachegrind, two runs at a time; prints the counts."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("--instructions needs valgrind (Debian: apt install valgrind)")
    jobs = [(suite, mode) for suite in suites for mode in MODES]
    at_once = 2 if (os.cpu_count() or 1) >= 2 else 1
    running: list[tuple[str, str, subprocess.Popen[str]]] = []
    counts: dict[tuple[str, str], int] = {}

    def finish(suite: str, mode: str, process: subprocess.Popen[str]) -> None:
        _, err = process.communicate()
        found = re.search(r"I\s+refs:\s+([\d,]+)", err)
        if found is None:
            sys.exit(f"{suite} {mode}: no instruction count from cachegrind:\n{err[-2000:]}")
        counts[(suite, mode)] = int(found.group(1).replace(",", ""))
        print(f"{suite} {mode}: {counts[(suite, mode)] / 1e9:.2f} G instructions", flush=True)

    for suite, mode in jobs:
        if len(running) == at_once:
            finish(*running.pop(0))
        targets, cwd, env = suites[suite]
        command = [
            valgrind,
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            *pytest_command(mode, targets),
        ]
        run_env = {**os.environ, **env, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=run_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        running.append((suite, mode, process))
    for job in running:
        finish(*job)

    print("\ninstructions executed, one run each under cachegrind")
    print(f"{'suite':<20} {'mode':<10} {'G instr':>9} {'ratio':>7}")
    for suite in suites:
        base = counts[(suite, "plain")]
        for mode in MODES:
            count = counts[(suite, mode)]
            print(f"{suite:<20} {mode:<10} {count / 1e9:>9.2f} {count / base:>6.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under cachegrind (one run per suite and mode) instead of timing",
    )
    args = parser.parse_args()
    try:
        import pytest_memray  # noqa: F401
    except ImportError:
        del MODES["memray"]
        print("pytest-memray not installed: pip install -e '.[bench]'")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        suites = {"more-itertools": more_itertools(work), "numpy linalg+fft": numpy_tests(work)}
        if args.instructions:
            count_instructions(suites)
            return
        times = {(suite, mode): [] for suite in suites for mode in MODES}
        cpu = {(suite, mode): [] for suite in suites for mode in MODES}
        modes = list(MODES)
        for round_ in range(args.rounds):
            order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
            for suite, (targets, cwd, env) in suites.items():
                seen = []
                for mode in order:
                    command = pytest_command(mode, targets)
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
        f"{'suite':<20} {'mode':<10} {'wall s':>8} {'ratio':>7} {'paired':>7} {'best':>7}"
        f" {'cpu s':>8} {'ratio':>7}"
    )
    print(header)
    for suite in suites:
        base = statistics.median(times[(suite, "plain")])
        fastest = min(times[(suite, "plain")])
        cpu_base = statistics.median(cpu[(suite, "plain")])
        for mode in MODES:
            median = statistics.median(times[(suite, mode)])
            paired = statistics.median(
                run / plain for run, plain in zip(times[(suite, mode)], times[(suite, "plain")])
            )
            best = min(times[(suite, mode)]) / fastest
            cpu_median = statistics.median(cpu[(suite, mode)])
            print(
                f"{suite:<20} {mode:<10} {median:>8.2f} {median / base:>6.2f}x {paired:>6.2f}x"
                f" {best:>6.2f}x {cpu_median:>8.2f} {cpu_median / cpu_base:>6.2f}x"
            )


if __name__ == "__main__":
    main()
