"""Line-by-line memory, as memory_profiler shows it, on the traced engine.

As a decorator, ``memgauge.profile`` prints a table after each call of the function::

    import memgauge

    @memgauge.profile
    def my_func():
        a = [1] * 1000000
        b = [2] * 9000000
        del b
        return a

From the command line, ``python -m memgauge.profile script.py [args]`` runs the script with a
builtin ``profile`` decorator (as ``python -m memory_profiler`` does) and prints one table per
decorated function when the script ends, its calls added up.

Columns, per line of the function:

- ``Mem usage``: the process RSS after the line (the highest seen over its executions), as
  memory_profiler shows it; read again after the traced memory moved by 256 KiB, or after a
  millisecond, since a read costs more than a short line;
- ``Increment``: the net traced bytes the line added, summed over its executions: exact;
- ``Peak``: the highest traced memory reached while the line ran, above the level at its start:
  a temporary that lives and dies inside the line shows here and nowhere else;
- ``Occurrences``: how many times the line ran (for the ``def`` line: calls).

Traced figures count every thread; with other threads allocating at the same time, a line's
figures include what they did meanwhile.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import IO, Any, Callable, TypeVar

from memgauge._native import LineTracer

F = TypeVar("F", bound=Callable[..., Any])
MIB = 2**20


@dataclass
class Line:
    """One row of a line profile. ``mem_usage`` is RSS bytes; the others are traced bytes."""

    lineno: int
    contents: str
    mem_usage: int | None = None
    increment: int = 0
    peak: int = 0
    occurrences: int = 0


@dataclass
class FunctionProfile:
    filename: str
    name: str
    lines: list[Line] = field(default_factory=list)

    def line(self, lineno: int) -> Line:
        """The row of a line number (KeyError when the function has no such line)."""
        for line in self.lines:
            if line.lineno == lineno:
                return line
        raise KeyError(lineno)


def code_of(target: Any) -> types.CodeType:
    """The code object of a function, method, or anything wrapping one."""
    seen = target
    target = inspect.unwrap(target)
    for attribute in ("__func__", "__code__"):
        target = getattr(target, attribute, target)
    if not isinstance(target, types.CodeType):
        raise TypeError(f"memgauge cannot profile {seen!r}: it has no Python code")
    return target


def thread_trace() -> Any:
    """The trace function new threads get: ``threading.gettrace()``, which 3.9 lacks (it keeps
    the function in the module global that ``gettrace`` returns from 3.10 on)."""
    gettrace = getattr(threading, "gettrace", None)
    return gettrace() if gettrace is not None else getattr(threading, "_trace_hook", None)


class LineProfiler:
    """Collects line figures for the functions added to it while it is enabled.

    ``with profiler:`` (or ``enable()`` / ``disable()``) traces the calling thread and the
    threads started meanwhile (every thread, from Python 3.12). Calls nest: only the outermost
    enable and disable act, so a decorated function may call another.

    ``events`` says where line events come from: ``"auto"`` takes ``sys.monitoring`` from
    Python 3.12 (events of the profiled functions only, under a free tool id, beside coverage
    and debuggers), and the trace function (``sys.settrace``'s C form) before 3.12 or when every
    tool id is taken; ``"sys.monitoring"`` or ``"settrace"`` ask for one. ``line_events`` says
    which one ran.
    """

    def __init__(self, *functions: Any, events: str = "auto") -> None:
        self._tracer = LineTracer(events)
        self._codes: dict[types.CodeType, str] = {}
        self._depth = 0
        self._saved_trace: Any = None
        self._saved_thread_trace: Any = None
        for function in functions:
            self.add_function(function)

    @property
    def line_events(self) -> str | None:
        """``"sys.monitoring"`` or ``"settrace"``: where the line events came from (None before
        the first enable)."""
        return self._tracer.line_events

    def add_function(self, function: Any) -> None:
        code = code_of(function)
        self._tracer.add_code(code)
        self._codes[code] = getattr(function, "__qualname__", code.co_name)

    def enable(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self._saved_trace = sys.gettrace()
        self._saved_thread_trace = thread_trace()
        self._tracer.enable()
        threading.settrace(self._tracer.thread_bootstrap)

    def disable(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        self._tracer.disable()
        threading.settrace(self._saved_thread_trace)
        if self._saved_trace is not None:
            sys.settrace(self._saved_trace)

    def __enter__(self) -> LineProfiler:
        self.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def __call__(self, function: F) -> F:
        """Wraps ``function`` so that its calls are profiled."""
        self.add_function(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def results(self) -> list[FunctionProfile]:
        rows: dict[types.CodeType, dict[int, tuple[int, int, int | None, int]]] = {}
        for code, lineno, increment, peak, rss, occurrences in self._tracer.stats():
            rows.setdefault(code, {})[lineno] = (increment, peak, rss, occurrences)
        profiles = []
        for code, name in self._codes.items():
            figures = rows.get(code, {})
            profile = FunctionProfile(code.co_filename, name)
            for lineno, contents in source_lines(code):
                line = Line(lineno, contents)
                if lineno in figures:
                    line.increment, line.peak, line.mem_usage, line.occurrences = figures[lineno]
                profile.lines.append(line)
            profiles.append(profile)
        return profiles

    def print_stats(self, stream: IO[str] | None = None, precision: int = 1) -> None:
        show_results(self, stream=stream, precision=precision)


def source_lines(code: types.CodeType) -> list[tuple[int, str]]:
    """The function's source lines, numbered; the lines the code spans when no source is found."""
    first = code.co_firstlineno
    lines = linecache.getlines(code.co_filename)
    try:
        block = inspect.getblock(lines[first - 1 :]) if lines else []
    except (IndexError, SyntaxError, TypeError):
        block = []
    if not block:
        linenos = sorted({line for _, _, line in code.co_lines() if line is not None})
        return [(n, "") for n in range(first, (linenos[-1] if linenos else first) + 1)]
    return [(first + i, text.rstrip("\n")) for i, text in enumerate(block)]


def format_mib(value: int | None, precision: int) -> str:
    if value is None:
        return ""
    return f"{value / MIB:{precision + 6}.{precision}f} MiB"


TEMPLATE = "{0:>6} {1:>12} {2:>12} {3:>12}  {4:>11}   {5:<}"


def render(profiles: list[FunctionProfile], precision: int = 1) -> str:
    """memory_profiler's table, with the traced Peak column after Increment."""
    out: list[str] = []
    for profile in profiles:
        header = TEMPLATE.format(
            "Line #", "Mem usage", "Increment", "Peak", "Occurrences", "Line Contents"
        )
        out += [f"Filename: {profile.filename}", "", header, "=" * len(header)]
        for line in profile.lines:
            if line.occurrences:
                figures = (
                    format_mib(line.mem_usage, precision),
                    format_mib(line.increment, precision),
                    format_mib(line.peak, precision),
                    line.occurrences,
                )
            else:
                figures = ("", "", "", "")
            out.append(TEMPLATE.format(line.lineno, *figures, line.contents))
        out += ["", ""]
    return "\n".join(out)


def show_results(profiler: LineProfiler, stream: IO[str] | None = None, precision: int = 1) -> None:
    (stream or sys.stdout).write(render(profiler.results(), precision))


def profile(function: Any = None, *, stream: IO[str] | None = None, precision: int = 1) -> Any:
    """Decorator: profile the function's lines and print the table after each call.

    ``@profile``, or ``@profile(stream=f, precision=2)``.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            profiler = LineProfiler(function)
            with profiler:
                result = function(*args, **kwargs)
            show_results(profiler, stream=stream, precision=precision)
            return result

        return wrapper  # type: ignore[return-value]

    if function is None:
        return decorate
    return decorate(function)


class _CallableModule(types.ModuleType):
    """``memgauge.profile`` is this module and the decorator at once."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return profile(*args, **kwargs)


if __name__ != "__main__":
    sys.modules[__name__].__class__ = _CallableModule


def main(argv: list[str] | None = None) -> int:
    import argparse
    import runpy

    parser = argparse.ArgumentParser(
        prog="python -m memgauge.profile",
        description="Run a script; print line-by-line memory of the functions it decorates "
        "with @profile.",
    )
    parser.add_argument("-o", "--output", help="write the tables to this file, not stdout")
    parser.add_argument("--precision", type=int, default=1, help="decimals of MiB (default 1)")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args(argv)
    if not os.path.isfile(options.script):
        parser.error(f"no such script: {options.script}")

    profiler = LineProfiler()
    import builtins

    builtins.profile = profiler  # type: ignore[attr-defined]
    sys.argv = [options.script, *options.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(options.script)))
    status = 0
    try:
        runpy.run_path(options.script, run_name="__main__")
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        while profiler._depth:
            profiler.disable()
        if options.output:
            with open(options.output, "w", encoding="utf-8") as stream:
                show_results(profiler, stream=stream, precision=options.precision)
        else:
            show_results(profiler, precision=options.precision)
    return status


if __name__ == "__main__":
    sys.exit(main())
