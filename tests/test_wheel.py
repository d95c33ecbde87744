"""The wheel `make wheel` builds, installed into a fresh virtual environment with no Rust on
PATH: `pytest --memprof` and `memgauge compare` on the examples, as a new user would run them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _platforms import linux_only

ROOT = Path(__file__).parent.parent
WHEELS = sorted(glob.glob(str(ROOT / "dist" / "memgauge-*.whl")))
pytestmark = linux_only("installs `make wheel`'s Linux wheel with /usr/bin on PATH: Linux only")


@pytest.mark.skipif(not WHEELS, reason="no wheel in dist/: run `make wheel` (make test does)")
def test_the_wheel_installs_and_runs_without_rust(tmp_path: Path):
    wheel = Path(WHEELS[-1])
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("memgauge/options.toml", "memgauge/_native.pyi", "memgauge/plugin.py"):
        assert needed in names, needed
    # Stripped: the extension without its debug info is about a megabyte.
    assert wheel.stat().st_size < 5 * 2**20, wheel.stat().st_size

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(wheel), "pytest"],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    # The environment's own bin and the system's, and no cargo or rustc among them.
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    project = tmp_path / "examples"
    shutil.copytree(
        ROOT / "examples", project, ignore=shutil.ignore_patterns(".memgauge", "__pycache__")
    )
    measured = subprocess.run(
        [python, "-m", "pytest", "--memprof", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert measured.returncode == 0, measured.stdout + measured.stderr
    # The installed package, not this source tree.
    where = subprocess.run(
        [python, "-c", "import memgauge; print(memgauge.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr
    gated = subprocess.run(
        [bin_dir / "memgauge", "compare"], cwd=project, env=env, capture_output=True, text=True
    )
    assert gated.returncode == 0, gated.stdout + gated.stderr
    assert "5 tests of" in gated.stdout and "0 regressions" in gated.stdout, gated.stdout


TEST_WHEEL = ROOT / ".github" / "scripts" / "test-wheel.sh"


@pytest.mark.skipif(not WHEELS, reason="no wheel in dist/: run `make wheel` (make test does)")
def test_the_release_workflow_runs_the_suite_against_the_installed_wheel(tmp_path: Path):
    """release.yml's test step, on this machine's wheel: a fresh environment, the wheel from
    the folder alone, memgauge imported from the environment and not from the source tree, and
    the suite (here a few of its tests, with pytest and nothing else installed) run from the
    repository root. Its pip install needs the package index, as the release job has."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(WHEELS[-1], wheels)
    run = subprocess.run(
        [
            "bash",
            str(TEST_WHEEL),
            str(wheels),
            sys.executable,
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_engine.py",
            "-k",
            "every_platform or test_what_stays_referenced_is_leaked",
        ],
        # The environment goes in TMPDIR (mktemp -d).
        env={
            **os.environ,
            "MEMGAUGE_REQUIREMENTS": "pytest pytest-asyncio",
            "TMPDIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"from {tmp_path}" in run.stdout, run.stdout
    assert "2 passed" in run.stdout, run.stdout

    # A wheel folder with nothing that fits is an error, not a silent install from the index.
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run(
        ["bash", str(TEST_WHEEL), str(empty), sys.executable, "--version"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0, refused.stdout
