"""%memit and %mprun, through IPython's own InteractiveShell."""

from __future__ import annotations

import pytest

IPython = pytest.importorskip("IPython")
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "memgauge")
    return shell


def test_memit_prints_rss_then_traced_figures(ip, capsys):
    ip.run_cell("import numpy as np; np.random.randn(10)")
    capsys.readouterr()
    ip.run_line_magic("memit", "np.random.randn(1000000)")
    rss_line, traced_line = capsys.readouterr().out.strip().splitlines()
    assert rss_line.startswith("peak memory: ") and ", increment: " in rss_line
    # 1,000,000 float64 = 8,000,000 bytes of data plus the array object.
    assert traced_line.startswith("traced peak: 7.63 MiB, leaked: 0.00 MiB"), traced_line


def test_memit_options_repeat_return_and_quiet(ip, capsys):
    result = ip.run_line_magic("memit", "-r 3 -o -q x = bytearray(50 * 2**20)")
    assert capsys.readouterr().out == ""
    assert len(result.traced_peak) == 3
    for peak in result.traced_peak:
        # 50 MiB and the bytearray object, plus the namespace's first `x` (a dict resize).
        assert abs(peak - 50 * MiB) <= 4096
    assert result.increment >= 0 and result.peak_memory >= result.baseline_rss
    assert "traced peak: 50.00 MiB" in str(result)


def test_cell_memit_runs_the_line_as_setup(ip, capsys):
    ip.run_cell_magic("memit", "big = bytearray(30 * 2**20)", "y = len(big)")
    out = capsys.readouterr().out
    assert "traced peak: 0.00 MiB" in out  # the setup's 30 MiB is not measured


def test_mprun_prints_the_line_table_and_saves_it(ip, capsys, tmp_path):
    ip.run_cell(
        "def my_func():\n    a = [1] * 1000000\n    b = [2] * 9000000\n    del b\n    return a\n"
    )
    capsys.readouterr()
    saved = tmp_path / "profile.txt"
    profiler = ip.run_line_magic("mprun", f"-r -T {saved} -f my_func my_func()")
    out = capsys.readouterr().out
    assert "Line #    Mem usage    Increment         Peak  Occurrences   Line Contents" in out
    assert "68.7 MiB" in out and "-68.7 MiB" in out
    assert "68.7 MiB" in saved.read_text(encoding="utf-8")
    assert profiler.results()[0].name == "my_func"


def test_cell_mprun_profiles_the_cell(ip, capsys):
    ip.run_cell("def grow():\n    return [0] * 200000\n")
    capsys.readouterr()
    ip.run_cell_magic("mprun", "-f grow", "x = grow()\ny = grow()\n")
    out = capsys.readouterr().out
    assert "3.1 MiB" in out  # two calls of 1,600,056 bytes


def test_mprun_without_a_function_is_a_clear_error(ip):
    with pytest.raises(ValueError, match="-f FUNCTION"):
        ip.run_line_magic("mprun", "print(1)")
