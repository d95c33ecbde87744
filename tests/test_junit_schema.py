"""The JUnit XML of `memgauge compare --junit` validates against the JUnit schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

xmlschema = pytest.importorskip("xmlschema")

SCHEMA = Path(__file__).parent / "data" / "junit.xsd"
ODD = "tests/test_ü.py::test_q[\"$`<&>']"


def record(peak: int, **extra: object) -> dict:
    return {
        "outcome": "passed",
        "file": "tests/t.py",
        "line": 3,
        "peak_bytes": peak,
        "leaked_bytes": 0,
        "allocations": 10,
        **extra,
    }


RESULTS = {
    "schema": 1,
    "tests": {
        "tests/t.py::test_grew": record(10_000_000),
        "tests/t.py::test_shrank": record(1_000_000),
        "tests/t.py::test_same": record(5_000_000),
        "tests/t.py::test_new": record(1),
        "tests/t.py::test_crashed": {"outcome": "error", "crashed": True},
        ODD: record(2_000_000),
    },
}
BASELINE = {
    "tests/t.py::test_grew": 1_000_000,
    "tests/t.py::test_shrank": 9_000_000,
    "tests/t.py::test_same": 5_000_000,
    "tests/t.py::test_crashed": 5,
    "tests/t.py::test_gone": 5,
    ODD: 1_000,
}


def compare_to_junit(directory: Path, *results: str) -> None:
    """`memgauge compare RESULTS... --baseline b.toml --junit junit.xml`: a regression."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgauge",
            "compare",
            *results,
            "--baseline",
            "b.toml",
            "--junit",
            "junit.xml",
        ],
        cwd=directory,
        capture_output=True,
        text=True,
        encoding="utf-8",  # what the CLI writes (test_ü.py), whatever the platform's locale
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr


def test_compare_junit_validates_against_the_schema(tmp_path: Path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    toml = ["schema = 1", ""]
    for test, peak in BASELINE.items():
        key = json.dumps(test)  # a JSON string is a TOML basic string
        toml += [f"[tests.{key}]", f"peak_bytes = {peak}", "leaked_bytes = 0", ""]
    (tmp_path / "b.toml").write_text("\n".join(toml))
    compare_to_junit(tmp_path, "results.json")
    schema = xmlschema.XMLSchema(SCHEMA)
    junit = tmp_path / "junit.xml"
    schema.validate(junit)
    document = schema.to_dict(junit)
    cases = document["testsuite"][0]["testcase"]
    assert {case["@name"] for case in cases} >= {"test_grew", "test_q[\"$`<&>']"}
    failed = [case["@name"] for case in cases if "failure" in case]
    assert sorted(failed) == ["test_grew", "test_q[\"$`<&>']"]


def test_the_schema_rejects_what_reporters_reject():
    schema = xmlschema.XMLSchema(SCHEMA)
    two_outcomes = (
        '<testsuites><testsuite name="s" tests="1"><testcase name="t">'
        '<failure message="a"/><skipped/></testcase></testsuite></testsuites>'
    )
    no_name = '<testsuites><testsuite name="s" tests="1"><testcase/></testsuite></testsuites>'
    bad_count = '<testsuites><testsuite name="s" tests="-1"/></testsuites>'
    for document in (two_outcomes, no_name, bad_count):
        assert not schema.is_valid(document), document


def test_a_matrix_gives_one_valid_testsuite_per_environment(tmp_path: Path):
    files = []
    for key, peak in (("cp311-linux-x86_64", 1_000_000), ("cp312-darwin-arm64", 9_000_000)):
        results = {
            "schema": 1,
            "environment": {"key": key},
            "tests": {"tests/t.py::test_a": record(peak)},
        }
        (tmp_path / f"{key}.json").write_text(json.dumps(results))
        files.append(f"{key}.json")
    (tmp_path / "b.toml").write_text(
        'schema = 2\n\n[tests."tests/t.py::test_a"."cp311-linux-x86_64"]\npeak_bytes = 1000000\n'
        '\n[tests."tests/t.py::test_a"."cp312-darwin-arm64"]\npeak_bytes = 1000000\n'
    )
    compare_to_junit(tmp_path, *files)
    schema = xmlschema.XMLSchema(SCHEMA)
    schema.validate(tmp_path / "junit.xml")
    suites = schema.to_dict(tmp_path / "junit.xml")["testsuite"]
    assert [(s["@name"], s["@failures"]) for s in suites] == [
        ("memgauge cp311-linux-x86_64", 0),
        ("memgauge cp312-darwin-arm64", 1),
    ]
