"""Does a rerun of an unchanged suite move its gated figures? Real third-party suites, five ways.

Run: python bench/determinism.py [--suites networkx attrs more-itertools] [--native]

For each suite, as a user would: `pytest --memprof` once and `memgauge baseline update` from
it; then, changing nothing, four more runs, each gated against that baseline with the defaults
(tolerance 10%, floor 64 KiB, peak and leaked): the same command again, `-n 2` (pytest-xdist),
the test files in reverse order, and a `-k` subset. The table gives, per mode, the tests whose
gated figures moved beyond the tolerance and the floor (regressed / improved). Target (issue
20): 0 moved in every mode and suite.

Last, the files in a shuffled order, gated twice: against the baseline of one run, and against
one learned (`baseline update R1 R2 R3`) from the first run, the reverse and the `-n 2` runs,
where a test that moved in those is allowed its spread, and counted as noisy.

It also times the suite: two plain runs and the two single-process `--memprof` runs, whole
processes, so the ratio is rough on this noisy VM; bench/suites.py is the speed figure.

Suites:
- networkx (installed; its tests are in the package): connectivity, flow, isomorphism and
  classes, about 1,900 tests that build and drop large cyclic structures;
- attrs (sdist from PyPI): about 1,400 tests, many of them hypothesis properties;
- more-itertools (sdist from PyPI): 765 small unittest tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from suites import sdist

Suite = tuple[list[str], Path, dict[str, str]]
SUBSET = "not _s and not _c"


def networkx(work: Path) -> Suite:
    spec = importlib.util.find_spec("networkx")
    if spec is None or spec.origin is None:
        sys.exit("networkx is not installed: pip install -e .[bench]")
    package = Path(spec.origin).parent
    parts = ["algorithms/connectivity", "algorithms/flow", "algorithms/isomorphism", "classes"]
    files = sorted(str(f) for part in parts for f in (package / part / "tests").glob("test_*.py"))
    return files, work, {}


def attrs(work: Path) -> Suite:
    root = sdist(work, "attrs")
    files = sorted(str(f.relative_to(root)) for f in (root / "tests").glob("test_*.py"))
    # The installed attrs is the one tested (the sdist's own needs its version generated).
    return files, root, {}


def more_itertools(work: Path) -> Suite:
    root = sdist(work, "more-itertools")
    files = sorted(str(f.relative_to(root)) for f in (root / "tests").glob("test_*.py"))
    return files, root, {"PYTHONPATH": str(root)}


SUITES = {"networkx": networkx, "attrs": attrs, "more-itertools": more_itertools}


def run(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    process = subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True)
    elapsed = time.perf_counter() - started
    # 0 all passed, 1 some tests failed (the suites' own failures are not ours).
    if process.returncode not in (0, 1):
        sys.stderr.write(process.stdout.decode()[-3000:] + process.stderr.decode()[-3000:])
        sys.exit(f"{' '.join(command[:6])}... exited {process.returncode}")
    return elapsed


def memgauge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memgauge", *args], capture_output=True, text=True, check=False
    )


def gate(results: Path, baseline: Path) -> dict[str, object]:
    """The tests whose gated figures moved, by `memgauge compare` with the defaults."""
    compare = memgauge("compare", str(results), "--baseline", str(baseline), "--format", "json")
    if compare.returncode not in (0, 1):
        sys.exit(compare.stderr)
    # The report has a comparison per environment (one here).
    comparisons = json.loads(compare.stdout)["environments"]

    def tests(kind: str) -> set[str]:
        return {c["test"] for comparison in comparisons for c in comparison.get(kind, [])}

    regressed = sorted(tests("regressions"))
    return {
        "regressed": regressed,
        "improved": sorted(tests("improvements") - set(regressed)),
        "noisy": len(tests("noisy")),
    }


def measure(name: str, suite: Suite, out: Path, native: bool) -> dict[str, object]:
    files, cwd, env = suite
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]

    def memprof(label: str, extra: list[str], targets: list[str]) -> tuple[Path, float]:
        results = out / f"{name}-{label}.json"
        command = [*pytest, "--memprof", f"--memprof-output={results}", *extra, *targets]
        if native:
            command.insert(len(pytest) + 1, "--memprof-native")
        return results, run(command, cwd, env)

    plain = [run([*pytest, *files], cwd, env)]
    base, first = memprof("baseline", [], files)
    baseline = out / f"{name}-baseline.toml"
    update = memgauge("baseline", "update", str(base), "--baseline", str(baseline))
    if update.returncode != 0:
        sys.exit(update.stderr)
    modes = {
        "rerun": ([], files),
        "-n 2": (["-n", "2"], files),
        "reverse": ([], files[::-1]),
        f"-k '{SUBSET}'": (["-k", SUBSET], files),
    }
    moved: dict[str, dict[str, object]] = {}
    timed = [first]
    runs: dict[str, Path] = {}
    for label, (extra, targets) in modes.items():
        results, seconds = memprof(label.split()[0].strip("-'"), extra, targets)
        runs[label] = results
        if label == "rerun":
            timed.append(seconds)
            plain.append(run([*pytest, *files], cwd, env))
        moved[label] = gate(results, baseline)
    # What stays is first use of shared state the plugin cannot see (a library's lazy cache,
    # a registry that grows): a baseline learned from runs in other orders knows it, as
    # noise. A new order, gated against one learned from the first run, its reverse and -n 2.
    learned = out / f"{name}-learned.toml"
    sources = [str(base), str(runs["reverse"]), str(runs["-n 2"])]
    update = memgauge("baseline", "update", *sources, "--baseline", str(learned))
    if update.returncode != 0:
        sys.exit(update.stderr)
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    results, _ = memprof("shuffled", [], shuffled)
    moved["shuffled"] = gate(results, baseline)
    moved["shuffled, learned"] = gate(results, learned)
    return {
        "tests": len(json.loads(base.read_text())["tests"]),
        "plain_s": statistics.median(plain),
        "memprof_s": statistics.median(timed),
        "moved": moved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--keep", type=Path, help="keep the results and baselines here")
    parser.add_argument(
        "--native", action="store_true", help="every --memprof run with --memprof-native too"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memgauge-determinism-") as temporary:
        work = Path(temporary)
        out = args.keep or work / "out"
        out.mkdir(parents=True, exist_ok=True)
        rows = {}
        for name in args.suites:
            print(f"{name}: preparing and running 8 times...", file=sys.stderr, flush=True)
            rows[name] = measure(name, SUITES[name](work), out, args.native)
    modes = list(next(iter(rows.values()))["moved"])
    traced = " (--memprof-native)" if args.native else ""
    print(
        f"\nTests whose gated figures moved{traced} (regressed / improved) against a baseline"
        " of one run"
    )
    print("| suite (tests) | " + " | ".join(modes) + " | --memprof / plain |")
    print("|---|" + "---|" * (len(modes) + 1))
    for name, row in rows.items():
        cells = []
        for mode in modes:
            moved = row["moved"][mode]
            cell = f"{len(moved['regressed'])} / {len(moved['improved'])}"
            if moved["noisy"]:
                cell += f" ({moved['noisy']} noisy)"
            cells.append(cell)
        ratio = row["memprof_s"] / row["plain_s"]
        timing = f"{ratio:.2f}x ({row['memprof_s']:.1f} s / {row['plain_s']:.1f} s)"
        print(f"| {name} ({row['tests']}) | " + " | ".join(cells) + f" | {timing} |")
    for name, row in rows.items():
        for mode, moved in row["moved"].items():
            for kind in ("regressed", "improved"):
                for test in moved[kind][:5]:
                    print(f"  {name} {mode}: {kind} {test}")


if __name__ == "__main__":
    main()
