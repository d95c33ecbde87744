"""What a test needs that one of CI's platforms (Linux, macOS, Windows) lacks, said once: skip
markers named for the need, each with a reason naming what is missing. On Linux none of them
skips a test that ran before (each needs only what Linux has)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

LINUX = sys.platform.startswith("linux")
MACOS = sys.platform == "darwin"
WINDOWS = sys.platform == "win32"


def linux_only(reason: str) -> pytest.MarkDecorator:
    """A test of something only Linux has (/proc, the kernel's exact RSS high water mark)."""
    return pytest.mark.skipif(not LINUX, reason=reason)


# Off Linux the RSS peak is the largest of 1 ms samples (`rss_sampled` is true), not the
# kernel's high water mark: a test of the exact figure is Linux's.
exact_rss_peak = linux_only("exact RSS peak: Linux only (sampled elsewhere)")
reads_proc = linux_only("reads /proc: Linux only")

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: not on Windows")
needs_sigkill = pytest.mark.skipif(
    not hasattr(signal, "SIGKILL"), reason="signal.SIGKILL: not on Windows"
)
# macOS has cc (clang); Windows runners have no cc.
needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None, reason="compiles a C helper with cc: no C compiler"
)


def _bash_major() -> int:
    """The major version of the bash on PATH, 0 if there is none or it does not say."""
    bash = shutil.which("bash")
    if bash is None:
        return 0
    try:
        done = subprocess.run(
            [bash, "-c", 'echo "${BASH_VERSINFO[0]}"'], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    answer = done.stdout.strip()
    return int(answer) if answer.isdigit() else 0


def bash_scripts() -> list[pytest.MarkDecorator]:
    """For tests that run the action's bash scripts (`shopt -s globstar`: bash 4 or later).
    Windows has no POSIX shell to run them (its `bash` may be WSL's, with another filesystem);
    macOS's /bin/bash is 3.2, a later one comes first on PATH on GitHub's runners. On Linux,
    asked nothing: the tests run as they always did."""
    if WINDOWS:
        return [
            pytest.mark.skip(reason="runs the action's bash scripts: no POSIX shell on Windows")
        ]
    if not LINUX and _bash_major() < 4:
        return [pytest.mark.skip(reason="the action's scripts need bash 4+ (globstar) on PATH")]
    return []
