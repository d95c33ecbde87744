"""The pytest plugin: ``pytest --memprof`` measures every test; ``@pytest.mark.memlimit`` gates one.

One stateful object, registered in ``pytest_configure``; the hooks are its methods.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import memgauge
from memgauge import _native
from memgauge import config as cfg
from memgauge.benchmark import Memit
from memgauge.config import posix_path
from memgauge.determinism import Determinism

MEMLIMIT_HELP = """memlimit(peak=None, *, rss=None, leak=None, allocations=None):
fail the test when it needs more memory. A positional size limits the traced peak:
memlimit("50 MiB"). Keywords limit the RSS peak (rss=), the bytes still held at the end
(leak=) and the number of allocations (allocations=). Sizes: a whole number of bytes or a
number with a unit: B, KB, MB, GB (powers of 1000), KiB, MiB, GiB (powers of 1024),
case-insensitive, decimals allowed ("1.5 GiB")."""

LIMIT_FIELDS = {
    "peak": ("peak_bytes", "traced peak"),
    "rss": ("rss_peak_bytes", "RSS peak"),
    "leak": ("leaked_bytes", "leaked"),
    "allocations": ("allocations", "allocations"),
}
FIGURES = (
    "peak_bytes",
    "leaked_bytes",
    "allocated_bytes",
    "allocations",
    "rss_peak_bytes",
    "rss_delta_bytes",
)
MEASUREMENT_KEY = pytest.StashKey[dict]()
BENCHMARKS_KEY = pytest.StashKey[list]()
SCOPE_KEY = pytest.StashKey[Any]()
# Why a test with a limit could not be measured: it fails rather than passes unchecked.
UNMEASURED_KEY = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memgauge", "memory figures per test (memgauge)")
    for option in cfg.OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": option.help}
        if option.kind == "bool":
            kwargs["action"] = "store_true"
        elif option.kind == "int":
            kwargs["type"] = int
        if option.choices:
            kwargs["choices"] = option.choices
        group.addoption(option.flag, **kwargs)
        if option.negatable:
            negation = "--no-" + option.flag[2:]
            group.addoption(
                negation, dest=option.dest, action="store_false", help=f"not {option.flag}"
            )
        parser.addini(option.ini_name, f"memgauge: {option.help}", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MEMLIMIT_HELP.replace("\n", " "))
    try:
        settings = Settings.load(config)
    except ValueError as error:
        raise pytest.UsageError(f"memgauge: {error}") from None
    plugin = MemgaugePlugin(config, settings)
    config.pluginmanager.register(plugin, "memgauge-plugin")
    if settings.scope == "all":
        config.pluginmanager.register(OneOutcome(plugin.limits), "memgauge-one-outcome")


@pytest.fixture
def memit(request: pytest.FixtureRequest) -> Memit:
    """Memory benchmark: ``memit(fn, *args, rounds=5, name=None, leak_per_round=None)``.

    Warms up, measures ``rounds`` calls, records their median traced peak, leaked bytes and
    allocations under ``<test id>::<name>`` in the results' ``benchmarks``, and returns the
    warm-up call's result. ``leak_per_round="1 KiB"`` fails the test when retained memory grows
    faster than that across rounds.
    """
    records = request.node.stash.setdefault(BENCHMARKS_KEY, [])
    return Memit(request.node, records)


@dataclass
class Settings:
    memprof: bool
    output: Path
    top: int
    scope: str
    default_limit: dict[str, int] | None
    seed: int | None
    environment: str
    shard: tuple[int, int] | None
    native: bool

    @classmethod
    def load(cls, config: pytest.Config) -> Settings:
        pyproject = cfg.read_pyproject(config.rootpath)
        for message in cfg.unknown_keys(pyproject):
            # As pytest does for an unknown ini option: a warning, naming the file.
            config.issue_config_time_warning(
                pytest.PytestConfigWarning(
                    f"memgauge: {config.rootpath / 'pyproject.toml'}: {message}"
                ),
                stacklevel=2,
            )
        values: dict[str, Any] = {}
        # A relative path on the command line is relative to where pytest was started (like
        # --junitxml); one from a config file is relative to the rootdir.
        output_base = config.rootpath
        for option in cfg.OPTIONS:
            value = config.getoption(option.dest)
            if value is not None and option.name == "output":
                output_base = config.invocation_params.dir
            if value is None and option.name in pyproject:
                value = cfg.coerce(option, pyproject[option.name], "[tool.memgauge]")
            if value is None:
                ini = config.getini(option.ini_name)
                value = cfg.coerce(option, ini, f"ini option {option.ini_name}") if ini else None
            values[option.name] = option.default if value is None else value
        default_limit = None
        if values["default-limit"]:
            default_limit = parse_limits("default-limit", (values["default-limit"],), {})
        seed = str(values["seed"]).strip()
        if seed.lower() == "off":
            seed_value = None
        elif seed.isdigit():
            seed_value = int(seed)
        else:
            raise ValueError(f"seed must be a whole number ≥ 0 or 'off', not {seed!r}")
        environment = cfg.environment_key(str(values["environment"]))
        native = bool(values["native"])
        if native and not _native.native_supported():
            config.issue_config_time_warning(
                pytest.PytestConfigWarning(
                    "memgauge: --memprof-native traces native allocations on Linux x86_64 only; "
                    "here the traced figures are Python's and NumPy's allocations"
                ),
                stacklevel=2,
            )
            native = False
        if native:
            # Figures that include native allocations are other figures: a baseline keeps
            # them apart, and `memgauge compare` will not gate one kind against the other.
            environment += _native.NATIVE_SUFFIX
        shard = cfg.parse_shard(values["shard"]) if values["shard"] else None
        output = Path(values["output"])
        if not output.is_absolute():
            output = output_base / output
        return cls(
            memprof=bool(values["memprof"]),
            output=output,
            top=int(values["top"]),
            scope=str(values["scope"]),
            default_limit=default_limit,
            seed=seed_value,
            environment=environment,
            shard=shard,
            native=native,
        )


def parse_limits(where: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
    """The limits of a memlimit marker, in bytes (or a count); ValueError names what is wrong."""
    if len(args) > 1:
        raise ValueError(f"{where}: memlimit takes one positional size (the peak), got {args!r}")
    unknown = set(kwargs) - set(LIMIT_FIELDS)
    if unknown:
        allowed = ", ".join(LIMIT_FIELDS)
        raise ValueError(f"{where}: unknown memlimit keyword {sorted(unknown)}; use {allowed}")
    given = dict(kwargs)
    if args:
        if "peak" in given:
            raise ValueError(f"{where}: memlimit got the peak twice (positional and peak=)")
        given["peak"] = args[0]
    if not given:
        raise ValueError(f"{where}: memlimit needs a limit, e.g. memlimit('50 MiB')")
    limits = {}
    for name, value in given.items():
        if isinstance(value, bool) or value is None:
            raise ValueError(f"{where}: memlimit {name}={value!r} is not a size")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"{where}: memlimit {name}={value!r} is negative")
            limits[name] = value
            continue
        if name == "allocations" and isinstance(value, str) and value.strip().isdigit():
            limits[name] = int(value)
            continue
        try:
            limits[name] = memgauge.parse_size(str(value))
        except ValueError as error:
            raise ValueError(f"{where}: memlimit {name}={value!r}: {error}") from None
    return limits


def describe(figure: str, value: int) -> str:
    return str(value) if figure == "allocations" else memgauge.format_size(value)


def site_lines(sites: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    return [
        f"{indent}{site['file']}:{site['line']} in {site['function']}: "
        f"{memgauge.format_size(site['bytes'])}"
        for site in sites
    ]


def check_limits(limits: dict[str, int], measured: dict[str, Any]) -> list[str]:
    """One line for each limit the measurement is over."""
    problems = []
    for name, allowed in limits.items():
        key, label = LIMIT_FIELDS[name]
        value = measured.get(key)
        if value is None:
            problems.append(f"{label}: not measured on this platform (limit {name}= is unchecked)")
            continue
        if value > allowed:
            over = value - allowed
            problems.append(
                f"{label} {describe(name, value)} is over the limit of {describe(name, allowed)} "
                f"by {describe(name, over)} ({value} > {allowed})"
            )
    return problems


def move_limit_failure(call: pytest.TestReport, teardown: pytest.TestReport) -> None:
    """Moves an exceeded limit, and the figures, from the teardown report to the call's: a test
    whose call passed fails there, with the limit's message; one that failed already keeps its
    failure, with the message added as a section. The teardown passes, as it did."""
    if not getattr(teardown, "memgauge_exceeded", False):
        return
    message = str(teardown.longrepr)
    teardown.outcome = "passed"
    teardown.longrepr = None
    teardown.memgauge_exceeded = False
    if call.passed:
        call.outcome = "failed"
        call.longrepr = message
        call.memgauge_exceeded = True
    else:
        call.sections.append(("memgauge: memory limit", message))
    record = getattr(teardown, "memgauge", None)
    if record is not None:
        call.memgauge = record
        del teardown.memgauge


class OneOutcome:
    """With ``--memprof-scope all`` a limit can only be checked once teardown has run, after
    the call was reported as passed: a test over its limit would count as passed and failed.
    Such tests run with their reports held back (as pytest-rerunfailures does), and an exceeded
    limit fails the call's report, so the test has one outcome. Registered only with that scope,
    so other runs' tests do not pass through it."""

    def __init__(self, limits: dict[str, dict[str, int]]) -> None:
        self.limits = limits

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        if item.nodeid not in self.limits:
            return None
        from _pytest.runner import runtestprotocol

        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        call = next((r for r in reports if r.when == "call"), None)
        teardown = next((r for r in reports if r.when == "teardown"), None)
        if call is not None and teardown is not None:
            move_limit_failure(call, teardown)
        for report in reports:
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True


class MemgaugePlugin:
    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.is_worker = hasattr(config, "workerinput")
        # Native tracing keeps its hooks in for the session: each test's scope finds them in
        # (no patching per test), and ctypes functions looked up at import are the hooks.
        self.native_held = settings.native and hold_native_hooks()
        self.arrow_pool = use_arrow_system_pool() if settings.native else None
        self.results: dict[str, dict[str, Any]] = {}
        self.benchmarks: dict[str, dict[str, Any]] = {}
        self.limits: dict[str, dict[str, int]] = {}
        self.paths: dict[str, str] = {}
        self.writer: _native.ResultsWriter | None = None
        self.locations: dict[str, tuple[str, int | None, str]] = {}
        # Site files as shown (relative to the rootdir), by the path the engine reports.
        self.relative_files: dict[str, str] = {}
        # Under `memgauge run`, each test's span goes to its run file.
        self.run_file = os.environ.get("MEMGAUGE_RUN_FILE") if settings.memprof else None
        self.determinism = Determinism(
            settings.seed, randomly=config.pluginmanager.has_plugin("randomly")
        )

    # ----- collection: read and check every limit up front -----

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if self.settings.shard:
            # The same split on every run and worker: by a hash of the id, not by position.
            shard = self.settings.shard
            kept, dropped = [], []
            for item in items:
                (kept if cfg.in_shard(item.nodeid, shard) else dropped).append(item)
            if dropped:
                self.config.hook.pytest_deselected(items=dropped)
                items[:] = kept
        errors = []
        for item in items:
            marker = item.get_closest_marker("memlimit")
            try:
                if marker is not None:
                    self.limits[item.nodeid] = parse_limits(item.nodeid, marker.args, marker.kwargs)
                elif self.settings.default_limit:
                    self.limits[item.nodeid] = self.settings.default_limit
            except ValueError as error:
                errors.append(str(error))
        if errors:
            raise pytest.UsageError("memgauge: invalid memory limits:\n" + "\n".join(errors))

    def wants(self, item: pytest.Item) -> bool:
        return self.settings.memprof or item.nodeid in self.limits

    # ----- under `memgauge run`: each test's span on the memory timeline -----

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        run_file = self.run_file
        if run_file is None:
            return (yield)
        start = time.time()
        try:
            return (yield)
        finally:
            span = {
                "event": "test",
                "id": item.nodeid,
                "start": start,
                "end": time.time(),
                "pid": os.getpid(),
            }
            line = (json.dumps(span) + "\n").encode()
            # One write to a file opened for appending: lines from xdist workers stay whole.
            try:
                # O_BINARY (Windows only): the line is written as it is, without "\r\n".
                fd = os.open(run_file, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as error:
                warnings.warn(f"memgauge: cannot write to {run_file}: {error}", stacklevel=1)

    # ----- measuring -----

    def start(self, item: pytest.Item) -> None:
        if not self.wants(item) or SCOPE_KEY in item.stash:
            return
        self.determinism.before()
        scope = memgauge.measure(top_sites=5, native=self.settings.native)
        try:
            scope.start()
        except RuntimeError as error:
            self.determinism.after()
            if item.nodeid in self.limits:
                item.stash[UNMEASURED_KEY] = str(error)
            else:
                warnings.warn(f"memgauge: {item.nodeid} not measured: {error}", stacklevel=1)
            return
        item.stash[SCOPE_KEY] = scope

    def stop(self, item: pytest.Item) -> None:
        scope = item.stash.get(SCOPE_KEY, None)
        if scope is None:
            return
        del item.stash[SCOPE_KEY]
        first_use = self.determinism.after()
        scope.stop()
        measured = scope.to_dict()
        for site in measured["top_sites"]:
            site["file"] = self.relative(site["file"])
        if first_use is not None:
            measured["first_use"] = first_use
        item.stash[MEASUREMENT_KEY] = measured
        for figure in FIGURES:
            item.user_properties.append((f"memgauge_{figure}", measured[figure]))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        if self.settings.scope == "all":
            self.start(item)
        return (yield)

    def relative(self, file: str) -> str:
        """A site's file relative to the rootdir when it is inside it, as pytest shows paths."""
        shown = self.relative_files.get(file)
        if shown is None:
            try:
                shown = Path(file).relative_to(self.config.rootpath).as_posix()
            except ValueError:
                shown = file
            self.relative_files[file] = shown
        return shown

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item):
        # pytest_runtest_call runs every kind of item (functions, unittest, doctests), unlike
        # pytest_pyfunc_call.
        if self.settings.scope == "call":
            self.start(item)
        try:
            return (yield)
        finally:
            if self.settings.scope == "call":
                self.stop(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item):
        try:
            return (yield)
        finally:
            self.stop(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report: pytest.TestReport = yield
        if call.when == "call" and item.stash.get(BENCHMARKS_KEY, None):
            report.memgauge_benchmarks = [dict(record) for record in item.stash[BENCHMARKS_KEY]]
        measured = item.stash.get(MEASUREMENT_KEY, None)
        when = "call" if self.settings.scope == "call" else "teardown"
        if call.when != when:
            return report
        unmeasured = item.stash.get(UNMEASURED_KEY, None)
        if unmeasured is not None and report.passed:
            report.outcome = "failed"
            report.longrepr = (
                f"MEMORY: {item.nodeid} has a memory limit, and it could not be measured: "
                f"{unmeasured}"
            )
            report.memgauge_exceeded = True
            return report
        if measured is None:
            return report
        limits = self.limits.get(item.nodeid)
        record = {**measured, "limits": limits or {}}
        report.memgauge = record
        if limits and report.passed:
            problems = check_limits(limits, measured)
            if problems:
                lines = [f"MEMORY: {item.nodeid} needs more memory than allowed:"]
                lines += [f"  {problem}" for problem in problems]
                # Sites under 1% of the peak are the test runner's own bookkeeping.
                floor = measured["peak_bytes"] / 100
                sites = [s for s in measured["top_sites"] if s["bytes"] >= floor]
                if sites:
                    lines.append("Lines holding the most memory at the peak:")
                    lines += site_lines(sites)
                report.outcome = "failed"
                report.longrepr = "\n".join(lines)
                report.memgauge_exceeded = True
        return report

    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config):
        if getattr(report, "memgauge_exceeded", False):
            return "failed", "M", ("MEMORY", {"red": True})
        return None

    # ----- collecting results (the controller, under xdist) -----

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.is_worker or not self.settings.memprof:
            return
        # Results stream beside the output as tests finish, so a run that dies still leaves
        # them; the writer (memgauge's one writer of the results schema) checks each record.
        shard = "{}/{}".format(*self.settings.shard) if self.settings.shard else None
        self.writer = _native.ResultsWriter(
            str(self.settings.output),
            json.dumps(
                environment(self.settings.environment, self.settings.native, self.arrow_pool)
            ),
            shard,
        )

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int, str]) -> None:
        self.locations[nodeid] = location
        if self.writer is not None:
            self.writer.start(nodeid)

    def result_key(self, report: pytest.TestReport) -> str:
        """The node id, made unique if two files produce the same one (--pyargs)."""
        nodeid, path = report.nodeid, str(report.fspath)
        seen = self.paths.setdefault(nodeid, path)
        return nodeid if seen == path else f"{path}::{nodeid.split('::', 1)[-1]}"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        record = getattr(report, "memgauge", None)
        benchmarks = getattr(report, "memgauge_benchmarks", None)
        if record is None and not benchmarks and report.passed:
            return  # Nothing to record: most reports (setup, subtests) end here.
        key = self.result_key(report)
        outcome = "passed" if report.passed else "skipped" if report.skipped else "failed"
        for benchmark in benchmarks or []:
            benchmark = dict(benchmark)
            benchmark_id = benchmark.pop("id")
            entry = {"outcome": outcome, **benchmark}
            self.record("benchmark", benchmark_id, entry)
        if record is not None:
            file, line, _ = report.location
            entry = {
                "outcome": outcome,
                # "/" on every OS, as in test ids and GitHub's annotations.
                "file": posix_path(file),
                "line": (line or 0) + 1,
                **record,
            }
            self.record("test", key, entry)
        elif report.when == "teardown" and report.failed and key in self.results:
            self.results[key]["outcome"] = "error"
            if self.writer is not None:
                self.writer.mark_error(key)
        elif report.when == "???" and report.failed and self.settings.memprof:
            # pytest-xdist reports a test whose worker died (killed, out of memory, segfault).
            file, line, _ = self.locations.get(report.nodeid, report.location)
            entry = {
                "outcome": "error",
                "crashed": True,
                "file": posix_path(file),
                "line": (line or 0) + 1,
            }
            self.record("test", key, entry)

    def record(self, kind: str, key: str, entry: dict[str, Any]) -> None:
        """A test's or a benchmark's record: kept for the summary, and written."""
        (self.results if kind == "test" else self.benchmarks)[key] = entry
        if self.writer is not None:
            write = self.writer.test if kind == "test" else self.writer.benchmark
            write(key, json.dumps(entry))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.native_held:
            _native.hold_native(False)
            self.native_held = False
        if self.arrow_pool is not None:
            os.environ.pop("ARROW_DEFAULT_MEMORY_POOL", None)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.determinism.close()
        if self.is_worker or not self.settings.memprof:
            return
        if self.writer is not None:
            tool = {"name": "memgauge", "version": memgauge.__version__}
            self.writer.finish(json.dumps(tool), json.dumps(self.determinism.describe()))
            self.writer = None

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_worker or not self.settings.memprof or not self.results:
            return
        measured = [(key, r) for key, r in self.results.items() if "peak_bytes" in r]
        top = sorted(measured, key=lambda item: item[1]["peak_bytes"], reverse=True)
        top = top[: self.settings.top]
        write = terminalreporter.write_line
        terminalreporter.write_sep("=", f"memgauge: {len(top)} tests with the highest peak")
        write(f"{'peak':>12} {'leaked':>12} {'RSS peak':>12}  test")
        for key, record in top:
            rss = record.get("rss_peak_bytes")
            rss_text = memgauge.format_size(rss) if rss is not None else "n/a"
            write(
                f"{memgauge.format_size(record['peak_bytes']):>12} "
                f"{memgauge.format_size(record['leaked_bytes']):>12} {rss_text:>12}  {key}"
            )
        traced = (
            "Python, NumPy and native code (malloc)" if self.settings.native else "Python and NumPy"
        )
        write(
            f"peak and leaked are traced (exact: what {traced} allocated); RSS peak is "
            "the process's resident memory (includes native libraries)."
        )
        write(f"results: {self.settings.output}")


def hold_native_hooks() -> bool:
    """Keeps the native hooks in for the session. ctypes (and cffi, where installed) are
    imported first, so that their ``dlsym`` calls go through the hooks from the start: a module
    that looks ``malloc`` up as it is imported, during collection, gets the hook. (An object
    loaded while no scope is open gets the hooks when the next test's scope opens.)"""
    import ctypes  # noqa: F401

    try:
        import _cffi_backend  # noqa: F401
    except ImportError:
        pass
    return _native.hold_native(True)


def use_arrow_system_pool() -> str | None:
    """Arrow's default memory pool is jemalloc or mimalloc, linked into libarrow with private
    symbols: its buffers would not be seen (and their arenas would never count, which is right,
    but neither would what they hold). Its system pool allocates with ``posix_memalign`` and
    ``free``, which the native hooks count. Selected before pyarrow reads its setting (at first
    use), or switched now if it was imported already; left alone if the user chose a pool.
    Returns the pool in use, or None when memgauge left it alone."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return None
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return "system"


def environment(key: str, native: bool, arrow_pool: str | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "key": key,
        # What the traced figures include: Python's allocators and NumPy's data buffers always,
        # the malloc family with --memprof-native.
        "traced": ["python", "numpy", *(["native"] if native else [])],
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "system": platform.platform(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        env["numpy"] = getattr(numpy, "__version__", "unknown")
    if arrow_pool is not None:
        # memgauge chose pyarrow's memory pool, so that its buffers are traced.
        env["arrow_memory_pool"] = arrow_pool
    return env
