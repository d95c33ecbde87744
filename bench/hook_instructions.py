"""Instructions the hooks cost per traced allocator event, counted, not timed.

Run: python bench/hook_instructions.py [--n 200000]

Runs bench/engine.py's workload twice under valgrind's callgrind (Debian: `apt install
valgrind`), once plain and once inside `memgauge.measure()`, and counts the calls of the
engine's allocator hooks in the second run. The difference of the two runs' instruction counts,
divided by the number of hook calls, is what one traced event costs: the hook, the tracker's
bookkeeping and the site lookup, everything the engine adds. Instruction counts repeat for the
same build and input whatever else the machine does, so two builds can be compared on a noisy
VM; they are not time (the hooks' instructions run faster than the interpreter's average).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = """
import sys
sys.path.insert(0, {bench!r})
from engine import workload
import memgauge
workload(1000)  # warm: first-use costs out of both runs
if {traced!r}:
    with memgauge.measure():
        workload({n})
else:
    workload({n})
"""

HOOK = re.compile(r"(hook_(malloc|calloc|realloc|free)|numpy_(malloc|calloc|realloc|free))")


def run(n: int, traced: bool, out: str) -> tuple[int, collections.Counter[str]]:
    """One run under callgrind: its total instructions, and the calls of each hook."""
    code = CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), traced=traced, n=n)
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", code],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return parse(out)


NAMED = re.compile(r"c?fn=\((\d+)\)(?: (.*))?")


def parse(path: str) -> tuple[int, collections.Counter[str]]:
    """The total of a callgrind profile, and the calls made to each hook function."""
    names: dict[str, str] = {}  # callgrind names a function once, then by its number
    calls: collections.Counter[str] = collections.Counter()
    total = 0
    target = ""
    with open(path) as profile:
        for line in profile:
            named = NAMED.match(line.rstrip("\n"))
            if named:
                number, name = named.groups()
                if name:
                    names[number] = name
                if line.startswith("cfn="):
                    target = names.get(number, "")
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
            elif line.startswith("calls=") and target:
                hook = HOOK.search(target)
                if hook:
                    calls[hook.group(1)] += int(line.split("=")[1].split()[0])
    return total, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="workload iterations")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench/hook_instructions.py needs valgrind (Debian: apt install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        plain, _ = run(args.n, False, os.path.join(tmp, "plain.out"))
        traced, calls = run(args.n, True, os.path.join(tmp, "traced.out"))
    events = sum(calls.values())
    if events == 0:
        sys.exit("no hook calls found in the profile: is the extension built with symbols?")
    print(
        f"workload n={args.n}: plain {plain / 1e6:.1f} M instructions, traced {traced / 1e6:.1f} M"
    )
    for name, count in sorted(calls.items()):
        print(f"  {name:<14} {count:>10} calls")
    print(f"traced / plain: {traced / plain:.3f}x")
    print(f"per traced event: {(traced - plain) / events:.1f} instructions ({events} events)")


if __name__ == "__main__":
    main()
