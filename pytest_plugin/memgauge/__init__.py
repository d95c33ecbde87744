"""memgauge: exact, deterministic memory figures for Python code and test suites.

>>> import memgauge
>>> with memgauge.measure() as m:
...     data = bytearray(10 * 2**20)
...     del data
>>> m.peak_bytes  # doctest: +SKIP
10485760

Traced figures (``peak_bytes``, ``leaked_bytes``, ``allocated_bytes``, ``allocations``) count
exactly what Python and NumPy asked the allocator for: deterministic, so a gate on them does not
flake. RSS figures (``rss_peak_bytes``, ``rss_delta_bytes``) are what the OS gave the process,
native libraries included.
"""

from __future__ import annotations

import sys
import sysconfig
import warnings
from typing import Any

from memgauge._native import Scope, __version__, format_size, parse_size, rss_bytes


def _free_threading_note() -> str | None:
    """What importing the engine did on a free-threaded build (None on any other build)."""
    if not sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    if sys._is_gil_enabled():  # type: ignore[attr-defined]
        return (
            "memgauge: its engine needs the GIL, so this free-threaded Python runs with the GIL "
            "from here on (threads take turns, as on a default build); the figures are exact"
        )
    return (
        "memgauge: its engine needs the GIL, and it is forced off here (PYTHON_GIL=0 or "
        "-X gil=0): nothing can be measured; run without that setting"
    )


_note = _free_threading_note()
if _note is not None:
    warnings.warn(_note, RuntimeWarning, stacklevel=2)

__all__ = [
    "LineProfiler",
    "Scope",
    "__version__",
    "format_size",
    "load_ipython_extension",
    "measure",
    "parse_size",
    "profile",
    "rss_bytes",
]


def measure(*, top_sites: int = 10, native: bool = False) -> Scope:
    """A measurement scope for a ``with`` block (or ``start()`` / ``stop()``).

    Allocations by the calling thread and by threads started inside the block count; threads
    that were already running do not. ``top_sites`` is how many ``file:line`` sites to report.
    ``native=True`` counts what C code allocates with ``malloc`` and its family too (C
    extensions, their libraries, ctypes): Linux on x86_64; elsewhere ``native_traced`` says
    it was not.
    """
    return Scope(top_sites, native=native)


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m memgauge.profile` runs the module only once.
    if name in ("profile", "LineProfiler"):
        import memgauge.profile

        return memgauge.profile if name == "profile" else memgauge.profile.LineProfiler
    raise AttributeError(f"module 'memgauge' has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext memgauge``: the ``%memit`` and ``%mprun`` magics."""
    from memgauge.magics import register

    register(ipython)
