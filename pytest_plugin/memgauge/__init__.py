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

from typing import Any

from memgauge._native import Scope, __version__, format_size, parse_size, rss_bytes

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


def measure(*, top_sites: int = 10) -> Scope:
    """A measurement scope for a ``with`` block (or ``start()`` / ``stop()``).

    Allocations by the calling thread and by threads started inside the block count; threads
    that were already running do not. ``top_sites`` is how many ``file:line`` sites to report.
    """
    return Scope(top_sites)


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
