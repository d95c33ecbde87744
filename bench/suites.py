"""pytest --memprof on real third-party suites, against plain pytest and pytest --memray.

Run: python bench/suites.py [--rounds 5] [--shard-seconds 5] [--modes plain,memgauge,...]
     python bench/suites.py --instructions   (once per suite and mode, under cachegrind)

Suites: more-itertools from its sdist (pure Python, unittest classes; downloaded from PyPI) and
NumPy's own installed tests (numpy.linalg and numpy.fft; NumPy's conftest needs hypothesis); with
`--suites`, also networkx's installed tests (pure Python, pytest functions) and attrs' tests
from its sdist (hypothesis-heavy). Target (issue 3):
--memprof at most 1.15x plain on each suite, and below pytest-memray.
"memgauge native" (--memprof-native) traces the malloc family too (issue 22: at most 1.10x plain
to be on by default), beside pytest-memray's --native.

This VM's speed drifts: plain runs of the same suite took 40 to 64 s in consecutive rounds,
in spells that last from seconds to minutes. A whole-suite run of one mode and the next mode's
run are a minute apart and see different spells. So each suite is cut into shards of about
`--shard-seconds` of plain run time (contiguous ranges of the collected tests, cut by a
calibration run), and the modes run each shard back to back, in an order that rotates from
shard to shard and round to round: the runs compared are seconds apart. (A single test is not
cut: more-itertools' test_primes is about half of its suite.) `--shard-seconds 0` runs whole
suites. Every run of round r has the hash seed r (the seed moves a run's time too).

Times, per round, are sums over the shards:
- `session`: from the end of collection to the end of the session, measured inside pytest
  (bench/shard_plugin.py): every test, and each plugin's session-end work (memgauge writes its
  results there). It leaves out interpreter start-up, imports and collection, which the modes
  share and which every shard repeats, so its ratio is the strict one;
- `process`: the whole `pytest` process, start-up and collection included;
- `cpu`: user + system time of the process (the kernel's accounting of finished children).
The table shows each mode's median over the rounds, the ratio of medians, the median of the
rounds' own ratios ("paired", the figure a slow spell moves least), and the ratio of the
fastest rounds ("best": noise only ever adds time).

`--instructions` counts instead: each suite runs once per mode under valgrind's cachegrind
(Debian: `apt install valgrind`), two at a time, and the table shows the instructions each run
executed. A count does not move with the VM, so it is the figure to compare changes by; it is
not time (the hooks' instructions run faster than the interpreter's average). NumPy's BLAS
runs one thread there (OPENBLAS_NUM_THREADS=1), and a few of its tests fail under valgrind's
floating point emulation, the same tests in every mode.
"""

from __future__ import annotations

import argparse
import json
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
from dataclasses import dataclass
from pathlib import Path

Suite = tuple[list[str], Path, dict[str, str]]


def sdist(work: Path, name: str) -> Path:
    """`name`'s source distribution from PyPI, unpacked in `work`: its root folder."""
    download = ["pip", "download", name, "--no-binary", ":all:", "--no-deps", "-q"]
    subprocess.run([sys.executable, "-m", *download, "-d", str(work)], check=True)
    stem = name.replace("-", "_")
    with tarfile.open(next(work.glob(f"{stem}-*.tar.gz"))) as archive:
        archive.extractall(work, filter="data")
    return next(p for p in work.iterdir() if p.is_dir() and p.name.startswith(f"{stem}-"))


def more_itertools(work: Path) -> Suite:
    root = sdist(work, "more-itertools")
    return ["tests"], root, {"PYTHONPATH": str(root)}


def numpy_tests(work: Path) -> Suite:
    return ["--pyargs", "numpy.linalg", "numpy.fft"], work, {}


def networkx_tests(work: Path) -> Suite:
    """networkx's installed tests: pure Python, plain pytest functions (which pytest-memray
    measures, unlike more-itertools' unittest classes); about 6,400 tests, minutes per run."""
    return ["--pyargs", "networkx"], work, {}


def attrs_tests(work: Path) -> Suite:
    """attrs' tests from its sdist, run against the installed attrs: about 1,400 tests, many of
    them hypothesis properties (the collector and the seeds are reset before each)."""
    return ["tests"], sdist(work, "attrs"), {}


SUITES = {
    "more-itertools": more_itertools,
    "numpy": numpy_tests,
    "networkx": networkx_tests,
    "attrs": attrs_tests,
}


MODES = {
    "plain": [],
    "memgauge": ["--memprof"],
    "memgauge native": ["--memprof", "--memprof-native"],
    "memray": ["--memray"],
    "memray native": ["--memray", "--native"],
}


def children_cpu() -> float:
    """User and system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pytest_command(mode: str, targets: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODES[mode], *targets]


def count_instructions(suites: dict[str, Suite]) -> None:
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


SHARD_PLUGIN = Path(__file__).resolve().parent


@dataclass
class Run:
    """One pytest process: its wall time, the session's time inside it, its CPU time."""

    process_s: float
    session_s: float
    cpu_s: float
    tests_s: list[float]

    def seconds(self) -> dict[str, float]:
        """The times the table compares, by kind."""
        return {"session": self.session_s, "process": self.process_s, "cpu": self.cpu_s}


KINDS = ("session", "process", "cpu")


def run_pytest(
    mode: str, suite: Suite, seed: int, tests: tuple[int, int] | None, work: Path
) -> Run:
    targets, cwd, env = suite
    out = work / "timings.json"
    out.unlink(missing_ok=True)
    paths = [str(SHARD_PLUGIN), env.get("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    run_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join(path for path in paths if path),
        "PYTHONHASHSEED": str(seed),
        "MEMGAUGE_BENCH_OUT": str(out),
        "MEMGAUGE_BENCH_RANGE": "" if tests is None else f"{tests[0]}:{tests[1]}",
    }
    command = [*pytest_command(mode, targets), "-p", "shard_plugin"]
    if mode.startswith("memgauge"):
        command += ["--memprof-output", str(work / "results.json")]
    cpu_before = children_cpu()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=run_env, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    cpu_s = children_cpu() - cpu_before
    if done.returncode not in (0, 1) or not out.exists():
        sys.exit(
            f"{' '.join(command)} exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    timings = json.loads(out.read_text())
    return Run(process_s, timings["session_s"], cpu_s, timings["tests_s"])


def cut(tests_s: list[float], shard_seconds: float) -> list[tuple[int, int]]:
    """Contiguous ranges of tests, each of about `shard_seconds` (one range when 0)."""
    if shard_seconds <= 0:
        return [(0, len(tests_s))]
    shards, start, total = [], 0, 0.0
    for index, seconds in enumerate(tests_s):
        total += seconds
        if total >= shard_seconds:
            shards.append((start, index + 1))
            start, total = index + 1, 0.0
    if start < len(tests_s):
        shards.append((start, len(tests_s)))
    return shards


def time_suites(suites: dict[str, Suite], rounds: int, shard_seconds: float, work: Path) -> None:
    modes = list(MODES)
    shards = {}
    for name, suite in suites.items():
        calibration = run_pytest("plain", suite, 0, None, work)
        shards[name] = cut(calibration.tests_s, shard_seconds)
        print(
            f"{name}: {len(calibration.tests_s)} tests, {calibration.session_s:.1f}s plain,"
            f" {len(shards[name])} shards",
            flush=True,
        )
    # totals[(suite, mode)][kind] is one sum over the shards per round.
    totals = {(name, mode): {kind: [] for kind in KINDS} for name in suites for mode in modes}
    for round_ in range(rounds):
        for name, suite in suites.items():
            sums = {mode: dict.fromkeys(KINDS, 0.0) for mode in modes}
            for index, tests in enumerate(shards[name]):
                turn = (round_ + index) % len(modes)
                for mode in modes[turn:] + modes[:turn]:
                    run = run_pytest(mode, suite, round_, tests, work)
                    if len(run.tests_s) != tests[1] - tests[0]:
                        print(f"{name} {mode}: ran {len(run.tests_s)} tests of {tests}")
                    for kind, seconds in run.seconds().items():
                        sums[mode][kind] += seconds
            for mode in modes:
                for kind in KINDS:
                    totals[(name, mode)][kind].append(sums[mode][kind])
            seen = ", ".join(f"{mode} {sums[mode]['session']:.1f}s" for mode in modes)
            print(f"round {round_ + 1}, {name}: {seen}", flush=True)

    print(f"\nmedians of {rounds} rounds, shards of about {shard_seconds:g}s plain")
    print(
        f"{'suite':<18} {'mode':<15} {'session s':>9} {'ratio':>6} {'paired':>6} {'best':>6}"
        f" {'process s':>9} {'ratio':>6} {'cpu s':>7} {'ratio':>6}"
    )
    for name in suites:
        plain = totals[(name, "plain")]
        base = {kind: statistics.median(plain[kind]) for kind in KINDS}
        for mode in modes:
            mine = totals[(name, mode)]
            median = {kind: statistics.median(mine[kind]) for kind in KINDS}
            ratio = {kind: median[kind] / base[kind] for kind in KINDS}
            paired = statistics.median(
                run / base for run, base in zip(mine["session"], plain["session"])
            )
            best = min(mine["session"]) / min(plain["session"])
            print(
                f"{name:<18} {mode:<15} {median['session']:>9.2f}"
                f" {ratio['session']:>5.2f}x {paired:>5.2f}x {best:>5.2f}x"
                f" {median['process']:>9.2f} {ratio['process']:>5.2f}x"
                f" {median['cpu']:>7.2f} {ratio['cpu']:>5.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--shard-seconds",
        type=float,
        default=5.0,
        help="plain run time per shard; 0 runs whole suites",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under cachegrind (one run per suite and mode) instead of timing",
    )
    parser.add_argument(
        "--suites",
        default="more-itertools,numpy",
        help=f"comma-separated, of {', '.join(SUITES)}",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, of {', '.join(MODES)} (plain is always run)",
    )
    args = parser.parse_args()
    modes = set(args.modes.split(",")) | {"plain"}
    if modes - set(MODES):
        parser.error(f"unknown modes {sorted(modes - set(MODES))}: choose from {', '.join(MODES)}")
    for mode in set(MODES) - modes:
        del MODES[mode]
    unknown = set(args.suites.split(",")) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites {sorted(unknown)}: choose from {', '.join(SUITES)}")
    try:
        import pytest_memray  # noqa: F401
    except ImportError:
        for mode in ("memray", "memray native"):
            MODES.pop(mode, None)
        print("pytest-memray not installed: pip install -e '.[bench]'")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        suites = {name: SUITES[name](work) for name in args.suites.split(",")}
        if args.instructions:
            count_instructions(suites)
        else:
            time_suites(suites, args.rounds, args.shard_seconds, work)


if __name__ == "__main__":
    main()
