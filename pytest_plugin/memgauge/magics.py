"""IPython magics: `%load_ext memgauge` registers %memit, %%memit, %mprun and %%mprun.

Same names and options as memory_profiler's, on the traced engine:

``%memit [-r N] [-t SECONDS] [-c] [-o] [-q] statement``
    Runs the statement ``N`` times (default 1) and prints memory_profiler's line, RSS based,
    ``peak memory: X MiB, increment: Y MiB``, then the traced figures of the run with the
    highest traced peak: ``traced peak: Z MiB, leaked: W MiB``. ``-t`` stops repeating once that
    many seconds have passed; ``-c`` adds the RSS high water mark of child processes that ended
    during the statement; ``-o`` returns a :class:`MemitResult`; ``-q`` prints nothing.
    ``-i INTERVAL`` is accepted and ignored: on Linux the RSS peak is exact (the kernel's high
    water mark), not sampled; on macOS and Windows it is sampled every millisecond. In
    ``%%memit``, the statement on the magic's line is setup, run once
    and not measured, and the cell is measured.

``%mprun -f FUNC [-f FUNC2 ...] [-T FILE] [-r] statement``
    Runs the statement with the lines of the named functions profiled and prints the table of
    :mod:`memgauge.profile`. ``-T`` also writes it to a file; ``-r`` returns the
    :class:`~memgauge.profile.LineProfiler`. In ``%%mprun`` the cell is the statement.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

import memgauge
from memgauge.profile import LineProfiler, render

MIB = 2**20


def children_max_rss() -> int:
    """The RSS high water mark of the largest child process waited for, in bytes (0 if unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class MemitResult:
    """What ``%memit -o`` returns. Sizes are bytes; one entry per run."""

    baseline_rss: int
    peak_rss: list[int] = field(default_factory=list)
    traced_peak: list[int] = field(default_factory=list)
    leaked: list[int] = field(default_factory=list)
    allocations: list[int] = field(default_factory=list)

    @property
    def peak_memory(self) -> int:
        return max(self.peak_rss, default=self.baseline_rss)

    @property
    def increment(self) -> int:
        return self.peak_memory - self.baseline_rss

    def __str__(self) -> str:
        best = max(range(len(self.traced_peak)), key=self.traced_peak.__getitem__, default=None)
        traced = (
            f"traced peak: {self.traced_peak[best] / MIB:.2f} MiB, "
            f"leaked: {self.leaked[best] / MIB:.2f} MiB"
            if best is not None
            else "traced peak: n/a"
        )
        return (
            f"peak memory: {self.peak_memory / MIB:.2f} MiB, "
            f"increment: {self.increment / MIB:.2f} MiB\n{traced}"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


@magics_class
class MemgaugeMagics(Magics):
    @line_cell_magic
    def memit(self, line: str = "", cell: str | None = None) -> MemitResult | None:
        """Memory a statement needs: RSS as memory_profiler reports it, and traced bytes."""
        opts, stmt = self.parse_options(line, "r:t:i:coq", posix=False, strict=False)
        repeat = max(1, int(getattr(opts, "r", 1)))
        timeout = float(getattr(opts, "t", 0) or 0)
        namespace = self.shell.user_ns
        if cell is not None:
            if stmt.strip():
                exec(compile(stmt, "<memit setup>", "exec"), namespace)
            stmt = cell
        if not stmt.strip():
            raise ValueError("%memit needs a statement to measure")
        code = compile(stmt, "<memit>", "exec")

        baseline = memgauge.rss_bytes()[0] or 0
        result = MemitResult(baseline_rss=baseline)
        started = time.monotonic()
        for _ in range(repeat):
            if result.peak_rss and timeout and time.monotonic() - started > timeout:
                break
            children_before = children_max_rss()
            start_rss = memgauge.rss_bytes()[0] or 0
            with memgauge.measure() as m:
                exec(code, namespace)
            peak = start_rss + (m.rss_peak_bytes or 0)
            if "c" in opts:
                children = children_max_rss()
                if children > children_before:
                    peak += children
            result.peak_rss.append(peak)
            result.traced_peak.append(m.peak_bytes)
            result.leaked.append(m.leaked_bytes)
            result.allocations.append(m.allocations)
        if "q" not in opts:
            print(result)
        return result if "o" in opts else None

    @line_cell_magic
    def mprun(self, parameter_s: str = "", cell: str | None = None) -> LineProfiler | None:
        """Line-by-line memory of the functions named with -f while a statement runs."""
        opts, stmt = self.parse_options(parameter_s, "rf:T:", list_all=True)
        if cell is not None:
            stmt = cell
        names = getattr(opts, "f", [])
        if not names:
            raise ValueError("%mprun needs at least one -f FUNCTION to profile")
        profiler = LineProfiler()
        for name in names:
            try:
                function = eval(name, self.shell.user_global_ns, self.shell.user_ns)
            except Exception as error:
                raise ValueError(f"%mprun -f {name}: {error}") from None
            profiler.add_function(function)
        with profiler:
            try:
                self.shell.ex(stmt)
            except SystemExit:
                print("*** SystemExit exception caught in code being profiled.")
            except KeyboardInterrupt:
                print("*** KeyboardInterrupt exception caught in code being profiled.")
        text = render(profiler.results())
        print(text)
        if "T" in opts:
            path = opts.T[-1]
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(text)
            print(f"\n*** Profile printout saved to text file {path}.")
        return profiler if "r" in opts else None


def register(ipython: Any) -> None:
    ipython.register_magics(MemgaugeMagics)
