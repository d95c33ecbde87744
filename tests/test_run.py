"""`memgauge run` / `plot` / `peak` / `list` / `clean`: memory over time for a whole command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _platforms import WINDOWS, needs_sigkill, reads_proc

MiB = 2**20
# A command that does nothing and exits 0: Windows has no `true`.
TRUE = [sys.executable, "-c", "pass"] if WINDOWS else ["true"]


def memgauge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memgauge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",  # what the CLI writes, whatever the platform's locale
        timeout=300,
    )


def load(path: Path) -> tuple[list[float], dict[int, list[int | None]], list[dict], dict]:
    times, processes, tests, header, exit_event = [], {}, [], {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "run":
            header = event
        elif event.get("event") == "test":
            tests.append(event)
        elif event.get("event") == "exit":
            exit_event = event
        else:
            for pid, rss in event["rss"]:
                processes.setdefault(pid, [None] * len(times)).append(rss)
            times.append(event["t"])
            for series in processes.values():
                series.extend([None] * (len(times) - len(series)))
    header["exit"] = exit_event
    return times, processes, tests, header


def totals(processes: dict[int, list[int | None]]) -> list[int]:
    return [sum(v or 0 for v in column) for column in zip(*processes.values())]


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


@reads_proc
def test_the_samples_show_the_shape_and_the_peak(tmp_path):
    write(
        tmp_path,
        "shape.py",
        """
        import time
        MiB = 2**20
        a = bytearray(300 * MiB); time.sleep(0.4)
        del a
        b = bytearray(50 * MiB); time.sleep(0.4)
        c = bytearray(250 * MiB); time.sleep(0.4)
        print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
        """,
    )
    done = memgauge(
        "run",
        "--interval",
        "5ms",
        "-o",
        "run.jsonl",
        "--",
        sys.executable,
        "shape.py",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    truth = int(done.stdout.split()[-1])
    times, processes, _, header = load(tmp_path / "run.jsonl")
    series = totals(processes)
    peak = max(series)
    assert abs(peak - truth) <= 0.05 * truth, (peak, truth)
    high = next(i for i, v in enumerate(series) if v >= peak - 40 * MiB)
    low = next(i for i in range(high, len(series)) if series[i] <= peak - 200 * MiB)
    assert any(v >= peak - 40 * MiB for v in series[low:]), "grew again"
    assert header["exit"]["code"] == 0 and len(times) > 50


CHILDREN = """
import multiprocessing, time

def hold():
    data = bytearray(100 * 2**20)
    time.sleep(1.0)

if __name__ == "__main__":
    children = [multiprocessing.Process(target=hold) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join()
"""


@pytest.mark.parametrize("include_children", [True, False])
def test_children_count_only_when_asked(tmp_path, include_children):
    write(tmp_path, "parent.py", CHILDREN)
    flags = ["--include-children"] if include_children else []
    done = memgauge(
        "run", *flags, "-o", "run.jsonl", "--", sys.executable, "parent.py", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    _, processes, _, header = load(tmp_path / "run.jsonl")
    parent_alone = max(v or 0 for v in processes[header["pid"]])
    peak = max(totals(processes))
    if include_children:
        assert len(processes) >= 3
        assert peak >= parent_alone + 200 * MiB, (peak, parent_alone)
    else:
        assert list(processes) == [header["pid"]]
        assert peak < parent_alone + 50 * MiB


def test_exit_codes_pass_through(tmp_path):
    done = memgauge(
        "run", "-o", "a.jsonl", "--", sys.executable, "-c", "import sys; sys.exit(7)", cwd=tmp_path
    )
    assert done.returncode == 7


@needs_sigkill
def test_a_killed_command_keeps_its_samples(tmp_path):
    killer = "import os, signal, time; time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)"
    done = memgauge(
        "run",
        "--interval",
        "1ms",
        "-o",
        "b.jsonl",
        "--",
        sys.executable,
        "-c",
        killer,
        cwd=tmp_path,
    )
    assert done.returncode == 128 + 9
    times, processes, _, header = load(tmp_path / "b.jsonl")
    assert len(times) > 50 and header["exit"]["code"] == 137
    # The killed process, not yet reaped, reads as 0 pages: no sample says so.
    assert all(v for series in processes.values() for v in series if v is not None)


def test_pytest_under_run_marks_each_test_and_plot_draws_them(tmp_path):
    write(
        tmp_path,
        "test_two.py",
        """
        import time

        def test_small():
            time.sleep(0.1)

        def test_big():
            data = bytearray(64 * 2**20)
            time.sleep(0.2)
        """,
    )
    done = memgauge(
        "run",
        "-o",
        "run.jsonl",
        "--",
        sys.executable,
        "-m",
        "pytest",
        "--memprof",
        "-q",
        "-p",
        "no:cacheprovider",
        "test_two.py",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _, _, tests, header = load(tmp_path / "run.jsonl")
    spans = {t["id"]: t for t in tests}
    assert set(spans) == {"test_two.py::test_small", "test_two.py::test_big"}
    big = spans["test_two.py::test_big"]
    assert header["started"] < big["start"] < big["end"]

    plot = memgauge("plot", "run.jsonl", "-o", "run.svg", "--title", "two tests", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    svg = (tmp_path / "run.svg").read_text(encoding="utf-8")
    assert svg.startswith("<svg") and "two tests" in svg
    assert "test_two.py::test_big" in svg and 'class="peak"' in svg
    assert "<polyline" in svg

    peak = memgauge("peak", "run.jsonl", cwd=tmp_path)
    assert peak.returncode == 0 and "peak " in peak.stdout


def test_list_and_clean_work_on_the_default_runs(tmp_path):
    for code in ("0", "3"):
        memgauge("run", "--", sys.executable, "-c", f"import sys; sys.exit({code})", cwd=tmp_path)
    listed = memgauge("list", cwd=tmp_path)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) >= 1
    assert memgauge("plot", cwd=tmp_path).returncode == 0  # the latest run
    cleaned = memgauge("clean", cwd=tmp_path)
    assert cleaned.returncode == 0 and "removed" in cleaned.stdout
    assert not list((tmp_path / ".memgauge" / "runs").glob("*"))


def test_bad_input_exits_2_naming_the_file(tmp_path):
    missing = memgauge("plot", "nope.jsonl", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    (tmp_path / "results.json").write_text('{"schema": 1, "tests": {}}\n')
    not_a_run = memgauge("peak", "results.json", cwd=tmp_path)
    assert not_a_run.returncode == 2 and "results.json" in not_a_run.stderr
    memgauge("run", "-o", "r.jsonl", "--", *TRUE, cwd=tmp_path)
    png = memgauge("plot", "r.jsonl", "-o", "r.png", cwd=tmp_path)
    assert png.returncode == 2 and "SVG" in png.stderr
    interval = memgauge("run", "--interval", "fast", "--", *TRUE, cwd=tmp_path)
    assert interval.returncode == 2 and "interval" in interval.stderr


SPIKES = """
import mmap, time
MiB = 2**20
time.sleep(0.3)
for _ in range(6):
    # 100 MiB mapped, touched and unmapped: about 60 ms here, shorter than the interval.
    block = mmap.mmap(-1, 100 * MiB)
    for offset in range(0, 100 * MiB, 4096):
        block[offset] = 1
    block.close()
    time.sleep(0.5)
"""


@reads_proc
def test_every_spike_between_two_samples_shows_in_the_samples(tmp_path):
    # Each sample is the kernel's high water mark since the previous one, reset after the
    # read: a 100 MiB spike that rises and falls between two 200 ms samples still shows.
    write(tmp_path, "spikes.py", SPIKES)
    done = memgauge(
        "run",
        "--interval",
        "200ms",
        "-o",
        "run.jsonl",
        "--",
        sys.executable,
        "spikes.py",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    _, processes, _, header = load(tmp_path / "run.jsonl")
    assert header["exit"]["samples"] == "peak"
    series = totals(processes)
    base = min(series[1:])  # the first sample may come before the interpreter started
    spikes, run = [], []
    for value in series:
        if value - base >= 50 * MiB:
            run.append(value - base)
        elif run:
            spikes.append(max(run))
            run = []
    if run:
        spikes.append(max(run))
    assert len(spikes) == 6, (spikes, series)
    for height in spikes:
        assert abs(height - 100 * MiB) <= 0.05 * 100 * MiB, [h / MiB for h in spikes]
