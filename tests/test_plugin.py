"""The pytest plugin, black-box through pytester."""

from __future__ import annotations

import json
import platform
import sys
import sysconfig
import xml.etree.ElementTree as ET

import pytest
from _platforms import needs_sigkill

MiB = 2**20

pytest_plugins = ["pytester"]


def results(pytester: pytest.Pytester, name: str = ".memgauge/results.json") -> dict:
    return json.loads((pytester.path / name).read_text(encoding="utf-8"))


def within(actual: int, expected: int, tolerance: float) -> bool:
    return abs(actual - expected) <= expected * tolerance


SUITE = """
import pytest

def test_ten_mib():
    data = bytearray(10 * 2**20)
    del data

def test_keeps_two_mib():
    test_keeps_two_mib.kept = bytearray(2 * 2**20)

@pytest.mark.parametrize("n", [1, 3])
def test_param(n):
    data = bytearray(n * 2**20)
    del data
"""


def test_memprof_writes_results_with_the_schema(pytester: pytest.Pytester):
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("--memprof")
    result.assert_outcomes(passed=4)
    data = results(pytester)
    assert data["schema"] == 1
    assert data["tool"]["name"] == "memgauge"
    assert {"python", "platform", "machine"} <= set(data["environment"])
    tests = data["tests"]
    assert set(tests) == {
        "test_suite.py::test_ten_mib",
        "test_suite.py::test_keeps_two_mib",
        "test_suite.py::test_param[1]",
        "test_suite.py::test_param[3]",
    }
    ten = tests["test_suite.py::test_ten_mib"]
    assert ten["outcome"] == "passed"
    assert (ten["file"], ten["line"]) == ("test_suite.py", 3)
    assert within(ten["peak_bytes"], 10 * MiB, 0.01)
    assert ten["leaked_bytes"] < 64 * 1024
    assert ten["allocated_bytes"] >= 10 * MiB and ten["allocations"] >= 1
    assert isinstance(ten["rss_peak_bytes"], int) and isinstance(ten["rss_delta_bytes"], int)
    assert ten["duration_s"] >= 0
    assert ten["top_sites"][0] == {
        "file": "test_suite.py",
        "line": 4,
        "function": "test_ten_mib",
        "bytes": ten["top_sites"][0]["bytes"],
    }
    assert within(tests["test_suite.py::test_keeps_two_mib"]["leaked_bytes"], 2 * MiB, 0.01)
    assert within(tests["test_suite.py::test_param[3]"]["peak_bytes"], 3 * MiB, 0.01)
    result.stdout.fnmatch_lines(
        [
            "*memgauge: 4 tests with the highest peak*",
            # 1% (three digits): a 3.9 frame object is a few hundred bytes of the call phase.
            "*10.0? MiB*test_suite.py::test_ten_mib",
        ]
    )
    assert not (pytester.path / ".memgauge/results.json.partial").exists()


def test_over_the_limit_fails_with_the_figure_and_the_line(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_limits="""
        import pytest

        @pytest.mark.memlimit("10 MiB")
        def test_over():
            data = bytearray(20 * 2**20)
            del data

        @pytest.mark.memlimit("30 MiB")
        def test_under():
            data = bytearray(20 * 2**20)
            del data
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_limits.py::test_over MEMORY*",
            "*test_limits.py::test_under PASSED*",
            # 3.9 adds its frame objects (a few KiB): three digits hold within 1%.
            "*traced peak 20.0? MiB is over the limit of 10.00 MiB*",
            "*Lines holding the most memory at the peak:*",
            "*test_limits.py:5 in test_over: 20.00 MiB*",
        ]
    )


def test_keyword_limits_and_units(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_kw="""
        import pytest
        KEEP = []

        @pytest.mark.memlimit(leak="1 MB")
        def test_leak_over():
            KEEP.append(bytearray(2_000_000))

        @pytest.mark.memlimit(peak="25mib", leak="10 KiB", allocations=100000)
        def test_all_under():
            data = bytearray(20 * 2**20)
            del data

        @pytest.mark.memlimit(allocations=10)
        def test_allocations_over():
            junk = [str(i) for i in range(1000)]

        @pytest.mark.memlimit(rss="1.5 GiB")
        def test_rss_under():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*leaked 1.91 MiB is over the limit of 976.56 KiB*",
            "*allocations * is over the limit of 10 *",
        ]
    )


def test_closest_marker_wins_on_classes_modules_and_params(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_scopes="""
        import pytest
        pytestmark = pytest.mark.memlimit("1 MiB")

        def test_module_limit_applies():
            data = bytearray(2 * 2**20)

        @pytest.mark.memlimit("4 MiB")
        class TestClass:
            def test_class_limit_applies(self):
                data = bytearray(2 * 2**20)

            @pytest.mark.memlimit("100 KiB")
            def test_function_limit_wins(self):
                data = bytearray(2 * 2**20)

        @pytest.mark.parametrize("n", [pytest.param(3, marks=pytest.mark.memlimit("8 MiB")), 2])
        def test_param(n):
            data = bytearray(n * 2**20)
        """
    )
    result = pytester.runpytest("-v")
    result.stdout.fnmatch_lines(
        [
            "*test_module_limit_applies MEMORY*",
            "*test_class_limit_applies PASSED*",
            "*test_function_limit_wins MEMORY*",
            "*test_param?3? PASSED*",
            "*test_param?2? MEMORY*",
        ]
    )


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('memlimit("50 XB")', "*test_bad.py::test_it: memlimit peak='50 XB'*unknown unit*"),
        ("memlimit(-5)", "*test_bad.py::test_it: memlimit peak=-5 is negative*"),
        ('memlimit(heap="1 MiB")', "*test_bad.py::test_it: unknown memlimit keyword*heap*"),
        ("memlimit()", "*test_bad.py::test_it: memlimit needs a limit*"),
    ],
)
def test_invalid_limit_is_a_collection_error(pytester: pytest.Pytester, marker, message):
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.{marker}
        def test_it():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_default_limit_and_options_from_pyproject(pytester: pytest.Pytester):
    pytester.makepyprojecttoml(
        """
        [tool.memgauge]
        memprof = true
        output = "out/mem.json"
        default-limit = "5 MiB"
        top = 1
        """
    )
    pytester.makepyfile(
        test_default="""
        import pytest

        def test_big():
            data = bytearray(6 * 2**20)

        @pytest.mark.memlimit("10 MiB")
        def test_marker_beats_default():
            data = bytearray(6 * 2**20)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*memgauge: 1 tests with the highest peak*"])
    assert "test_default.py::test_big" in results(pytester, "out/mem.json")["tests"]
    # The command line wins over pyproject.
    result = pytester.runpytest("--memprof-output=cli.json")
    assert (pytester.path / "cli.json").exists()


def test_ini_options_and_bad_config_values(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nmemgauge_memprof = true\nmemgauge_output = ini.json\n")
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)
    assert "test_one.py::test_one" in results(pytester, "ini.json")["tests"]

    pytester.makeini("[pytest]\nmemgauge_top = lots\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*memgauge_top*must be a whole number, not 'lots'*"])


def test_every_kind_of_item_is_measured(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_kinds='''
        import unittest

        class TestCaseStyle(unittest.TestCase):
            def test_unittest(self):
                data = bytearray(3 * 2**20)
                del data

        def helper():
            """
            >>> data = bytearray(4 * 2**20)
            >>> len(data)
            4194304
            """

        class TestPlain:
            def test_method(self):
                data = bytearray(5 * 2**20)
                del data
        '''
    )
    result = pytester.runpytest("--memprof", "--doctest-modules")
    result.assert_outcomes(passed=3)
    tests = results(pytester)["tests"]
    assert within(tests["test_kinds.py::TestCaseStyle::test_unittest"]["peak_bytes"], 3 * MiB, 0.01)
    assert within(tests["test_kinds.py::test_kinds.helper"]["peak_bytes"], 4 * MiB, 0.02)
    assert within(tests["test_kinds.py::TestPlain::test_method"]["peak_bytes"], 5 * MiB, 0.01)


def test_threads_async_subprocess_and_memoryerror(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_misc="""
        import asyncio, subprocess, sys, threading
        import pytest

        def test_thread():
            kept = []
            t = threading.Thread(target=lambda: kept.append(bytearray(6 * 2**20)))
            t.start(); t.join()

        @pytest.mark.asyncio
        async def test_async():
            await asyncio.sleep(0)
            data = bytearray(7 * 2**20)
            await asyncio.sleep(0)

        def test_subprocess():
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        def test_memoryerror():
            with pytest.raises(MemoryError):
                bytearray(2**62)

        @pytest.mark.memlimit("1 GiB")
        def test_failure_is_not_masked():
            assert 1 == 2
        """
    )
    result = pytester.runpytest("--memprof", "-p", "asyncio")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*assert 1 == 2*"])
    tests = results(pytester)["tests"]
    assert within(tests["test_misc.py::test_thread"]["peak_bytes"], 6 * MiB, 0.01)
    assert within(tests["test_misc.py::test_async"]["peak_bytes"], 7 * MiB, 0.02)
    assert tests["test_misc.py::test_failure_is_not_masked"]["outcome"] == "failed"


def test_junit_properties(pytester: pytest.Pytester):
    pytester.makepyfile(test_j="def test_j():\n    data = bytearray(2**20)\n")
    pytester.runpytest("--memprof", "--junitxml=junit.xml").assert_outcomes(passed=1)
    tree = ET.parse(pytester.path / "junit.xml")
    properties = {p.get("name"): p.get("value") for p in tree.iter("property")}
    assert within(int(properties["memgauge_peak_bytes"]), MiB, 0.01)
    assert {"memgauge_leaked_bytes", "memgauge_allocations", "memgauge_rss_peak_bytes"} <= set(
        properties
    )


def test_xdist_matches_serial(pytester: pytest.Pytester):
    pytester.makepyfile(test_suite=SUITE)
    pytester.runpytest_subprocess("--memprof", "--memprof-output=serial.json")
    result = pytester.runpytest_subprocess("-n", "2", "--memprof", "--memprof-output=xdist.json")
    result.assert_outcomes(passed=4)
    serial = results(pytester, "serial.json")["tests"]
    parallel = results(pytester, "xdist.json")["tests"]
    assert set(serial) == set(parallel)
    for test_id, record in serial.items():
        # Same traced bytes, give or take the runner's own bookkeeping (a few KiB).
        for figure in ("peak_bytes", "leaked_bytes"):
            assert abs(record[figure] - parallel[test_id][figure]) <= 16 * 1024, (test_id, figure)


KILL_SUITE = """
import os, signal

def test_a():
    data = bytearray(2**20)

def test_dies():
    os.kill(os.getpid(), signal.SIGKILL)

def test_b():
    data = bytearray(2 * 2**20)
"""


@needs_sigkill
def test_killed_worker_keeps_the_other_results(pytester: pytest.Pytester):
    pytester.makepyfile(test_kill=KILL_SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "--memprof", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    tests = results(pytester)["tests"]
    assert tests["test_kill.py::test_dies"] == {
        "outcome": "error",
        "crashed": True,
        "file": "test_kill.py",
        "line": 6,
    }
    assert within(tests["test_kill.py::test_b"]["peak_bytes"], 2 * MiB, 0.01)


@needs_sigkill
def test_a_killed_serial_run_leaves_its_stream(pytester: pytest.Pytester):
    pytester.makepyfile(test_kill=KILL_SUITE)
    pytester.runpytest_subprocess("--memprof")
    assert not (pytester.path / ".memgauge/results.json").exists()
    partial = pytester.path / ".memgauge/results.json.partial"
    lines = partial.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    finished = [e["id"] for e in events if e["event"] == "test"]
    started = [e["id"] for e in events if e["event"] == "start"]
    assert finished == ["test_kill.py::test_a"]
    assert started[-1] == "test_kill.py::test_dies"


BENCH_SUITE = """
cache = []

def build(n):
    return [0] * n

def leaky(n):
    cache.append(bytearray(n))

def steady(n):
    return bytearray(n)

def test_build(memit):
    result = memit(build, 1_000_000, rounds=3)
    assert len(result) == 1_000_000
    memit(build, 10, name="tiny")

def test_leaks(memit):
    memit(leaky, 100_000, rounds=4, leak_per_round="1 KiB")

def test_steady(memit):
    memit(steady, 100_000, rounds=4, leak_per_round="1 KiB")
"""


def test_memit_records_benchmarks_and_catches_growth(pytester: pytest.Pytester):
    pytester.makepyfile(test_bench=BENCH_SUITE)
    result = pytester.runpytest("--memprof")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*memit test_bench.py::test_leaks::leaky: the memory retained grew by 97.* KiB "
            "per round over 3 rounds (allowed 1.00 KiB per round).",
            "Lines holding the growth:",
            "*test_bench.py:7 leaky: *",
        ]
    )
    benchmarks = results(pytester)["benchmarks"]
    build = benchmarks["test_bench.py::test_build::build"]
    assert build["outcome"] == "passed" and build["rounds"] == 3
    assert (build["file"], build["line"]) == ("test_bench.py", 12)
    # The result is still held when the call returns: it counts as leaked.
    assert within(build["peak_bytes"], 8_000_056, 0.001)
    assert within(build["leaked_bytes"], 8_000_056, 0.001)
    assert "test_bench.py::test_build::tiny" in benchmarks
    assert benchmarks["test_bench.py::test_leaks::leaky"]["outcome"] == "failed"


def test_memgauge_compare_gates_benchmarks(pytester: pytest.Pytester):
    pytester.makepyfile(test_bench="def test_b(memit):\n    memit(bytearray, 1_000_000)\n")
    pytester.runpytest("--memprof").assert_outcomes(passed=1)
    update = pytester.run("memgauge", "baseline", "update")
    assert update.ret == 0, update.stderr.str()
    assert (
        '[tests."test_bench.py::test_b::bytearray".'
        in (pytester.path / "memgauge-baseline.toml").read_text()
    )
    # A source of another length: of the same length and within the same second, the import
    # takes the first run's bytecode from __pycache__ (its check is mtime in seconds and size).
    pytester.makepyfile(test_bench="def test_b(memit):\n    memit(bytearray, 10_000_000)\n")
    pytester.runpytest("--memprof").assert_outcomes(passed=1)
    compare = pytester.run("memgauge", "compare")
    assert compare.ret == 1
    compare.stdout.fnmatch_lines(["*test_bench.py::test_b::bytearray*"])


def test_a_limited_test_that_cannot_be_measured_fails(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_full="""
        import pytest
        import memgauge

        @pytest.fixture
        def every_scope_taken():
            scopes = [memgauge.measure() for _ in range(32)]
            for scope in scopes:
                scope.start()
            yield
            for scope in reversed(scopes):
                scope.stop()

        @pytest.mark.memlimit("1 GiB")
        def test_limited(every_scope_taken):
            pass

        def test_unlimited(every_scope_taken):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*MEMORY: test_full.py::test_limited has a memory limit, and it could not be measured*"]
    )


def test_results_name_their_environment_as_configured(pytester: pytest.Pytester):
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    pytester.runpytest("--memprof").assert_outcomes(passed=1)
    key = results(pytester)["environment"]["key"]
    major, minor = sys.version_info[:2]
    threaded = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
    machine = platform.machine().lower()
    assert key == f"cp{major}{minor}{threaded}-{sys.platform}-{machine}"

    # A template from pyproject: a dependency's version added, the platform dropped.
    pytester.makepyprojecttoml(
        '[tool.memgauge]\nenvironment = "{python}-pytest{version:pytest}-{version:no-such-pkg}"\n'
    )
    pytester.runpytest("--memprof").assert_outcomes(passed=1)
    key = results(pytester)["environment"]["key"]
    assert key == f"cp{major}{minor}{threaded}-pytest{pytest.__version__}-none"

    result = pytester.runpytest("--memprof", "--memprof-environment", "{python}-{os}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*environment: unknown field {os} in '{python}-{os}'; use*"])
    result = pytester.runpytest("--memprof", "--memprof-environment", "my env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*a key is one or more ASCII letters, digits*"])


def test_shards_split_a_suite_and_every_test_runs_in_exactly_one(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_many="import pytest\n\n@pytest.mark.parametrize('n', range(40))\n"
        "def test_n(n):\n    pass\n"
    )
    seen = []
    for index in (1, 2, 3):
        output = f"shard{index}.json"
        result = pytester.runpytest(
            "--memprof", f"--memprof-shard={index}/3", f"--memprof-output={output}"
        )
        assert result.ret == pytest.ExitCode.OK
        document = results(pytester, output)
        assert document["shard"] == f"{index}/3"
        assert document["tests"], "each of three shards of 40 tests has some"
        seen.extend(document["tests"])
    assert sorted(seen) == sorted(f"test_many.py::test_n[{n}]" for n in range(40))
    result = pytester.runpytest("--memprof-shard=0/3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*shard: '0/3' is not a shard: write K/N*"])


def test_an_unknown_key_in_tool_memgauge_is_a_warning_naming_the_nearest(
    pytester: pytest.Pytester,
):
    pytester.makepyprojecttoml('[tool.memgauge]\nmemprof = true\ntolerence = "1%"\n')
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest("-W", "default")
    result.assert_outcomes(passed=1, warnings=1)
    output = result.stdout.str()
    assert (
        "pyproject.toml: unknown key 'tolerence' in [tool.memgauge]: did you mean tolerance?"
        in output
    )
    # The gate's own keys are known to the plugin too: no warning.
    pytester.makepyprojecttoml(
        '[tool.memgauge]\nmemprof = true\ntolerance = "1%"\nbaseline = "b"\n'
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_a_limit_checked_at_teardown_gives_the_test_one_outcome(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_all="""
        import pytest

        @pytest.fixture
        def big_teardown():
            yield
            data = bytearray(8 * 2**20)
            del data

        @pytest.mark.memlimit("1 MiB")
        def test_over_in_teardown(big_teardown):
            pass

        @pytest.mark.memlimit("1 MiB")
        def test_over_and_failing():
            data = bytearray(8 * 2**20)
            del data
            assert False, "the test's own failure"

        @pytest.mark.memlimit("64 MiB")
        def test_within(big_teardown):
            pass
        """
    )
    result = pytester.runpytest("--memprof", "--memprof-scope", "all", "-rA")
    # Before: the call's report passed and the teardown's failed, two outcomes for one test.
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*test_over_in_teardown needs more memory than allowed*"])
    assert "the test's own failure" in result.stdout.str()
    outcomes = {key: record["outcome"] for key, record in results(pytester)["tests"].items()}
    assert outcomes == {
        "test_all.py::test_over_in_teardown": "failed",
        "test_all.py::test_over_and_failing": "failed",
        "test_all.py::test_within": "passed",
    }
