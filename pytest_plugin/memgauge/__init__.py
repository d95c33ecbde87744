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

from memgauge._native import Scope, __version__, format_size, parse_size, rss_bytes

__all__ = ["Scope", "__version__", "format_size", "measure", "parse_size", "rss_bytes"]


def measure(*, top_sites: int = 10) -> Scope:
    """A measurement scope for a ``with`` block (or ``start()`` / ``stop()``).

    Allocations by the calling thread and by threads started inside the block count; threads
    that were already running do not. ``top_sites`` is how many ``file:line`` sites to report.
    """
    return Scope(top_sites)
