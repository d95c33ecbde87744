"""The GitHub action's shell step, run locally with the Actions environment files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

RUN_SH = Path(__file__).parent.parent / ".github" / "actions" / "memgauge" / "run.sh"
# A test id with quotes, a dollar sign, backticks and unicode must survive every step.
TRICKY = "q\"uo'te $HOME `whoami` ünï"

SUITE = f"""
import os
import pytest

@pytest.mark.parametrize("case", [1], ids=[{TRICKY!r}])
def test_tricky(case):
    data = bytearray(int(os.environ["ALLOC_MIB"]) * 2**20)
    del data
"""


def run_action(
    project: Path, alloc_mib: int, **inputs: str
) -> tuple[subprocess.CompletedProcess, dict, str]:
    output = project / "github_output"
    summary = project / "step_summary.md"
    output.write_text("")
    summary.write_text("")
    env = {
        **os.environ,
        "ALLOC_MIB": str(alloc_mib),
        "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(output),
        "GITHUB_STEP_SUMMARY": str(summary),
        "INPUT_PYTEST_ARGS": "-q -p no:cacheprovider tests",
        **inputs,
    }
    result = subprocess.run(
        ["bash", str(RUN_SH)], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return result, outputs, summary.read_text()


@pytest.mark.skipif(shutil.which("memgauge") is None, reason="needs the installed console script")
def test_action_gates_and_passes_odd_test_ids_through(tmp_path: Path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_tricky.py").write_text(SUITE)
    # Without this pytest escapes non-ASCII in ids; users who set it get unicode ids.
    (tmp_path / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        "disable_test_id_escaping_and_forfeit_all_rights_to_community_support = true\n"
    )

    first, outputs, _ = run_action(tmp_path, 1)
    # No baseline yet: bad input, exit 2, and the message says how to make one.
    assert first.returncode == 2, first.stdout + first.stderr
    assert "memgauge baseline update" in first.stderr
    assert outputs["pytest-status"] == "0"

    update = subprocess.run(
        ["memgauge", "baseline", "update", outputs["results"]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert update.returncode == 0, update.stderr
    baseline = tomllib.loads((tmp_path / "memgauge-baseline.toml").read_text())
    assert f"tests/test_tricky.py::test_tricky[{TRICKY}]" in baseline["tests"]

    same, outputs, summary = run_action(tmp_path, 1)
    assert same.returncode == 0, same.stdout + same.stderr
    assert outputs["gate-status"] == "0"
    assert "0 regressions" in summary

    grown, outputs, summary = run_action(tmp_path, 4)
    assert grown.returncode == 1, grown.stdout + grown.stderr
    assert outputs["gate-status"] == "1"
    annotation = next(line for line in grown.stdout.splitlines() if line.startswith("::error"))
    assert annotation.startswith("::error file=tests/test_tricky.py,line=5,")
    assert f"tests/test_tricky.py::test_tricky[{TRICKY}]: peak" in annotation
    assert TRICKY.replace("`", "'") in summary
    junit = (tmp_path / outputs["junit"]).read_text()
    assert "$HOME" in junit and "ünï" in junit and "<failure" in junit
