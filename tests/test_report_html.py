"""`memgauge report --format html`: a self-contained page, checked in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from _platforms import LINUX

RESULTS = {
    "schema": 1,
    "tool": {"name": "memgauge"},
    "environment": {},
    "tests": {
        "t.py::test_small": {
            "outcome": "passed",
            "file": "t.py",
            "line": 1,
            "peak_bytes": 1000,
            "leaked_bytes": 300,
            "allocations": 3,
            "rss_peak_bytes": 4096,
        },
        "t.py::test_grew": {
            "outcome": "passed",
            "file": "t.py",
            "line": 5,
            "peak_bytes": 50_000_000,
            "leaked_bytes": 10,
            "allocations": 9,
            "top_sites": [
                {"file": "t.py", "line": 6, "function": "test_grew", "bytes": 50_000_000}
            ],
        },
        "t.py::test_<new>": {
            "outcome": "failed",
            "file": "t.py",
            "line": 9,
            "peak_bytes": 20_000,
            "leaked_bytes": 20_000,
            "allocations": 1,
        },
    },
}
BASELINE = """schema = 1

[tests."t.py::test_small"]
peak_bytes = 1000
leaked_bytes = 300

[tests."t.py::test_grew"]
peak_bytes = 10000000
leaked_bytes = 10

[tests."t.py::test_gone"]
peak_bytes = 5
"""
RUN = [
    {"event": "run", "command": ["pytest", "--memprof"], "started": 100.0, "pid": 1},
    {"t": 0.0, "rss": [[1, 20_000_000]]},
    {"event": "test", "id": "t.py::test_grew", "start": 100.2, "end": 100.6, "pid": 1},
    {"t": 0.5, "rss": [[1, 80_000_000], [2, 10_000_000]]},
    {"t": 1.0, "rss": [[1, 30_000_000]]},
    {"event": "exit", "t": 1.0, "code": 0},
]


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    if not LINUX:
        # `make browser` is apt-get's chromium: elsewhere the test runs only if one is on PATH.
        pytest.skip("needs chromium on PATH (`make browser` installs it on Debian only)")
    if os.environ.get("MEMGAUGE_REQUIRE_BROWSER"):
        pytest.fail("no chromium on PATH: `make browser` installs Debian's package")
    pytest.skip("needs chromium (make browser)")


@pytest.fixture
def report(tmp_path: Path) -> Path:
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "base.toml").write_text(BASELINE)
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(line) + "\n" for line in RUN))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgauge",
            "report",
            "results.json",
            "--format",
            "html",
            "-o",
            "report.html",
            "--baseline",
            "base.toml",
            "--run",
            "run.jsonl",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        encoding="utf-8",  # what the CLI writes, whatever the platform's locale
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tmp_path / "report.html"


def test_the_page_is_self_contained_and_marks_the_baseline(report: Path):
    html = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=""", html), "fetches nothing"
    assert "t.py::test_&lt;new&gt;" in html
    regressed = re.findall(r'<tr class="regressed"><td data-v="([^"]+)"', html)
    assert regressed == ["t.py::test_grew"]
    assert "regressed: peak +400.0%" in html
    assert "missing from the results" in html and "t.py::test_gone" in html
    assert "<svg" in html and "peak 85.8 MiB at 0.50 s" in html


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        if kind == b"IDAT":
            chunks.append(data[offset + 8 : offset + 8 + length])
        offset += 12 + length
    return width, height, zlib.decompress(b"".join(chunks))


def test_chromium_shows_the_table_and_the_chart_without_console_errors(report: Path):
    chromium = browser()
    base = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,1000",
    ]
    url = report.as_uri() + "#sort=leaked_bytes:asc"
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, encoding="utf-8", timeout=120
    )
    assert dom.returncode == 0, dom.stderr
    assert 'data-ready="yes"' in dom.stdout, "the script ran"
    order = re.findall(r'<tr[^>]*><td data-v="([^"]+)"', dom.stdout)
    # Sorted by leaked bytes, ascending, as the URL asks; the missing test has none.
    assert order[:3] == ["t.py::test_gone", "t.py::test_grew", "t.py::test_small"], order
    assert "<polyline" in dom.stdout and 'class="peak"' in dom.stdout
    assert "memgauge report: 4 rows" in dom.stderr, "console messages are captured"
    console_errors = [
        line
        for line in dom.stderr.splitlines()
        if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)
    ]
    assert console_errors == []

    shot = report.with_name("shot.png")
    done = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert done.returncode == 0 and shot.exists()
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1200, 1000)
    # A page with a table and a chart, not a blank one: many distinct bytes.
    assert len(set(pixels)) > 50
