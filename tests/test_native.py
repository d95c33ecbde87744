"""Native allocations (``measure(native=True)``, ``--memprof-native``): the malloc family as C code
calls it, counted through the hooks memgauge writes into the loaded objects' GOT slots.

Ground truth comes from a small C library each test run compiles, which allocates known sizes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import memgauge
import pytest
from _platforms import needs_cc
from memgauge import _native

MiB = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(not _native.native_supported(), reason="native tracing: Linux x86_64"),
    needs_cc,
]

LIBRARY_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

size_t alloc_free(size_t n) {
    char *p = malloc(n);
    if (!p) return 0;
    memset(p, 1, n);
    size_t s = (size_t)p[n - 1];
    free(p);
    return s;
}
void *alloc_touch(size_t n) { char *p = malloc(n); if (p) memset(p, 1, n); return p; }
void release(void *p) { free(p); }

int each_function(size_t n) {
    /* Each allocates n bytes and frees them; returns how many failed. */
    int failed = 0;
    void *p = calloc(n / 16, 16); failed += !p; free(p);
    if (posix_memalign(&p, 64, n) != 0) failed++; else free(p);
    p = aligned_alloc(64, n); failed += !p; free(p);
    p = memalign(64, n); failed += !p; free(p);
    p = valloc(n); failed += !p; free(p);
    p = reallocarray(NULL, n / 8, 8); failed += !p; free(p);
    return failed;
}

void *realloc_grow(void) {
    /* 1 KiB -> 64 MiB, doubling; the block is left to the caller. */
    char *p = realloc(NULL, 1024);
    for (size_t n = 2048; n <= (size_t)64 << 20; n *= 2) {
        p = realloc(p, n);
        if (!p) return NULL;
        p[n - 1] = 1;
    }
    return p;
}
void *realloc_zero(void *p) { return realloc(p, 0); }

void *lookup_default(void) { return dlsym(RTLD_DEFAULT, "malloc"); }
void *lookup_next(void) { return dlsym(RTLD_NEXT, "malloc"); }
void *lookup_in(void *handle) { return dlsym(handle, "malloc"); }

/* Volatile: a compiler may drop a malloc whose block is never used, and fold its test. */
static void *volatile sink;
int failing_malloc_errno(void) {
    errno = 0;
    sink = malloc(SIZE_MAX / 2);
    return sink ? -1 : errno;
}

/* Threads: each holds `hold` bytes until told to stop, churning small blocks meanwhile. */
static volatile int stop_threads;
static pthread_t threads[64];
static int thread_count;
static size_t hold_bytes;
static int ready;
static void *churn(void *arg) {
    (void)arg;
    char *held = malloc(hold_bytes);
    if (held) memset(held, 1, hold_bytes);
    __atomic_add_fetch(&ready, 1, __ATOMIC_SEQ_CST);
    while (!stop_threads) {
        void *p = malloc(64);
        free(p);
    }
    free(held);
    return NULL;
}
int start_threads(int n, size_t hold) {
    /* Returns once every thread holds its block. */
    stop_threads = 0; hold_bytes = hold; thread_count = 0; ready = 0;
    for (int i = 0; i < n && i < 64; i++)
        if (pthread_create(&threads[thread_count], NULL, churn, NULL) == 0) thread_count++;
    while (__atomic_load_n(&ready, __ATOMIC_SEQ_CST) < thread_count) sched_yield();
    return thread_count;
}
void stop_and_join(void) {
    stop_threads = 1;
    for (int i = 0; i < thread_count; i++) pthread_join(threads[i], NULL);
    thread_count = 0;
}
"""

# How each variant is linked: lazily bound PLT slots, slots bound at load time and made
# read-only (RELRO), and calls through GOT entries with no PLT at all.
VARIANTS = {
    "lazy": [],
    "now-relro": ["-Wl,-z,now,-z,relro"],
    "no-plt": ["-fno-plt", "-Wl,-z,now,-z,relro"],
}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("native")
    source = folder / "alloc.c"
    source.write_text(LIBRARY_C)
    built = {}
    for name, flags in VARIANTS.items():
        library = folder / f"alloc-{name}.so"
        command = ["cc", "-shared", "-fPIC", "-O1", "-pthread", *flags, str(source)]
        subprocess.run([*command, "-o", str(library), "-ldl"], check=True)
        built[name] = library
    return built


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.alloc_free.argtypes = [ctypes.c_size_t]
    library.alloc_free.restype = ctypes.c_size_t
    library.alloc_touch.argtypes = [ctypes.c_size_t]
    library.alloc_touch.restype = ctypes.c_void_p
    library.release.argtypes = [ctypes.c_void_p]
    library.each_function.argtypes = [ctypes.c_size_t]
    library.realloc_grow.restype = ctypes.c_void_p
    library.realloc_zero.argtypes = [ctypes.c_void_p]
    library.realloc_zero.restype = ctypes.c_void_p
    library.start_threads.argtypes = [ctypes.c_int, ctypes.c_size_t]
    return library


def within(figure: int, truth: int, tolerance: float = 0.01) -> bool:
    return abs(figure - truth) <= truth * tolerance


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_library_loaded_before_the_scope_is_counted(libraries, variant):
    library = load(libraries[variant])
    with memgauge.measure(native=True) as scope:
        library.alloc_free(10 * MiB)
    assert scope.native_traced
    # 10 MiB within 1%; what else the scope saw is ctypes' few KiB.
    assert within(scope.peak_bytes, 10 * MiB), scope.peak_bytes
    assert scope.leaked_bytes < 64 * 1024


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_library_opened_inside_the_scope_is_counted(libraries, variant, tmp_path):
    # A copy: a path the loader has not loaded yet, so the load happens inside the scope.
    fresh = tmp_path / libraries[variant].name
    shutil.copy(libraries[variant], fresh)
    with memgauge.measure(native=True) as scope:
        library = load(fresh)
        library.alloc_free(10 * MiB)
    assert within(scope.peak_bytes, 10 * MiB, 0.02), scope.peak_bytes


def test_without_native_the_library_is_not_seen(libraries):
    library = load(libraries["lazy"])
    with memgauge.measure() as scope:
        library.alloc_free(10 * MiB)
    assert not scope.native_traced
    assert scope.peak_bytes < MiB


def test_each_function_of_the_family_is_exact(libraries):
    library = load(libraries["now-relro"])
    with memgauge.measure(native=True) as scope:
        assert library.each_function(8 * MiB) == 0
    # Each of the six allocates 8 MiB and frees it before the next: the peak is one of them.
    assert within(scope.peak_bytes, 8 * MiB), scope.peak_bytes
    assert scope.allocated_bytes >= 6 * 8 * MiB
    assert scope.leaked_bytes < 64 * 1024


def test_realloc_growing_and_to_zero(libraries):
    library = load(libraries["lazy"])
    with memgauge.measure(native=True) as grown:
        block = library.realloc_grow()
    assert block
    assert within(grown.peak_bytes, 64 * MiB), grown.peak_bytes
    assert within(grown.leaked_bytes, 64 * MiB), grown.leaked_bytes
    with memgauge.measure(native=True) as freed:
        # glibc frees the block for realloc(p, 0); the scope sees a free of a block it never
        # counted, which changes nothing.
        library.realloc_zero(block)
    assert freed.leaked_bytes < 64 * 1024
    assert freed.peak_bytes < 64 * 1024


def test_a_block_from_before_the_scope_freed_inside_it_changes_nothing(libraries):
    library = load(libraries["lazy"])
    block = library.alloc_touch(4 * MiB)
    with memgauge.measure(native=True) as scope:
        library.release(block)
    # Figures are unsigned: a block subtracted that was never added would wrap to ~2**64.
    assert scope.peak_bytes < 64 * 1024
    assert scope.leaked_bytes < 64 * 1024


def test_ctypes_malloc_of_the_c_library_is_counted():
    with memgauge.measure(native=True) as scope:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        block = libc.malloc(100 * MiB)
        ctypes.memset(block, 1, 100 * MiB)
        libc.free(block)
    assert within(scope.peak_bytes, 100 * MiB), scope.peak_bytes


def test_errno_is_what_the_real_function_left(libraries):
    library = load(libraries["lazy"])
    with memgauge.measure(native=True):
        assert library.failing_malloc_errno() == errno.ENOMEM


def test_numpy_arrays_and_bytearrays_are_counted_once():
    numpy = pytest.importorskip("numpy")
    with memgauge.measure(native=True) as array:
        data = numpy.ones(100_000_000 // 8)
        del data
    with memgauge.measure(native=True) as buffer:
        data = bytearray(100_000_000)
        del data
    assert within(array.peak_bytes, 100_000_000), array.peak_bytes
    assert within(buffer.peak_bytes, 100_000_000), buffer.peak_bytes


def test_every_slot_is_restored_after_the_last_scope(libraries):
    library = load(libraries["no-plt"])
    with memgauge.measure(native=True):
        with memgauge.measure(native=True):
            library.alloc_free(MiB)
        # The outer scope still traces.
        assert _native.native_slots()[1] > 0
    total, hooked = _native.native_slots()
    assert total > 0
    assert hooked == 0


THREADS_AND_SCOPES = """
import ctypes, sys, memgauge
MiB = 1 << 20
library = ctypes.CDLL(sys.argv[1])
library.start_threads.argtypes = [ctypes.c_int, ctypes.c_size_t]
# Eight threads started before any scope: they churn throughout and count in none.
library.start_threads(8, 0)
worst = 0
for round in range(200):
    with memgauge.measure(native=True) as scope:
        pass
    worst = max(worst, scope.peak_bytes)
library.stop_and_join()
# Eight started inside the scope, each holding 1 MiB: 8 MiB.
with memgauge.measure(native=True) as inside:
    assert library.start_threads(8, MiB) == 8
    library.stop_and_join()
print(worst, inside.peak_bytes, inside.leaked_bytes)
"""


def test_native_threads_while_scopes_open_and_close(libraries):
    result = subprocess.run(
        [sys.executable, "-c", THREADS_AND_SCOPES, str(libraries["lazy"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    worst, peak, leaked = map(int, result.stdout.split())
    # Threads running before a scope opened are not its own: their 64-byte churn stays out.
    assert worst < 64 * 1024, worst
    # The threads started inside: 8 x 1 MiB, their stacks (mmap) not counted, plus 64-byte
    # churn blocks and pthread's bookkeeping.
    assert 8 * MiB <= peak <= 8 * MiB + 256 * 1024, peak
    assert leaked < 64 * 1024, leaked


FORK_INSIDE = """
import ctypes, os, sys, memgauge
MiB = 1 << 20
library = ctypes.CDLL(sys.argv[1])
library.alloc_free.argtypes = [ctypes.c_size_t]
with memgauge.measure(native=True) as scope:
    library.alloc_free(4 * MiB)
    pid = os.fork()
    if pid == 0:
        library.alloc_free(16 * MiB)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), scope.peak_bytes)
"""


def test_a_fork_inside_a_scope(libraries):
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-c",
            FORK_INSIDE,
            str(libraries["lazy"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    code, peak = map(int, result.stdout.split())
    assert code == 0
    # The child's 16 MiB are the child's: the parent's scope saw its own 4 MiB.
    assert within(peak, 4 * MiB, 0.02), peak


def test_the_hooks_leave_the_process_as_it_was(libraries):
    """Start and stop many times: the slots come and go each time, and nothing breaks."""
    library = load(libraries["now-relro"])
    for _ in range(50):
        with memgauge.measure(native=True) as scope:
            library.alloc_free(MiB)
        assert within(scope.peak_bytes, MiB, 0.05)
    assert _native.native_slots()[1] == 0
    # A library opened after the hooks came out is untouched, and works.
    copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"memgauge-native-{os.getpid()}.so"
    shutil.copy(libraries["lazy"], copy)
    try:
        assert load(copy).alloc_free(MiB) == 1
    finally:
        copy.unlink()


def test_dlsym_answers_hooks_in_a_handle_and_passes_the_rest_on(libraries):
    # RTLD_NEXT's and RTLD_DEFAULT's answers depend on who asks: the trampoline passes them on
    # untouched; a lookup in a handle (ctypes', cffi's) gets the hook while the hooks are in.
    library = load(libraries["lazy"])
    for name in ("lookup_default", "lookup_next", "lookup_in"):
        getattr(library, name).restype = ctypes.c_void_p
    library.lookup_in.argtypes = [ctypes.c_void_p]

    def address_of_malloc() -> int:
        return ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value

    real = address_of_malloc()
    with memgauge.measure(native=True):
        hooked = address_of_malloc()
        in_handle = library.lookup_in(ctypes.CDLL(None)._handle)
        default = library.lookup_default()
        following = library.lookup_next()
    assert hooked != real
    assert in_handle == hooked
    assert default == real
    # The next object after the library's that defines malloc: libc's definition, which is
    # the canonical address too unless a non-PIE interpreter holds that (Debian's python3).
    assert following and following != hooked
    assert address_of_malloc() == real


NATIVE_SUITE = """
import ctypes
import pytest

MiB = 1 << 20
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def test_twenty_mib_from_c():
    block = libc.malloc(20 * MiB)
    ctypes.memset(block, 1, 20 * MiB)
    libc.free(block)


@pytest.mark.memlimit("10 MiB")
def test_over_a_limit_in_c():
    block = libc.malloc(20 * MiB)
    ctypes.memset(block, 1, 20 * MiB)
    libc.free(block)
"""


def test_memprof_native_counts_c_allocations_and_says_so(pytester: pytest.Pytester):
    import json

    pytester.makepyfile(test_c=NATIVE_SUITE)
    # The module looks malloc up at import, before any test's scope: ctypes gets the hook
    # because the plugin keeps the native hooks in for the whole session, with ctypes loaded
    # first. A process of its own, where ctypes is not loaded yet.
    result = pytester.runpytest_subprocess("--memprof", "--memprof-native")
    result.assert_outcomes(passed=1, failed=1)
    data = json.loads((pytester.path / ".memgauge/results.json").read_text())
    assert data["environment"]["key"].endswith("+native")
    assert data["environment"]["traced"] == ["python", "numpy", "native"]
    twenty = data["tests"]["test_c.py::test_twenty_mib_from_c"]
    assert within(twenty["peak_bytes"], 20 * MiB), twenty["peak_bytes"]
    result.stdout.fnmatch_lines(["*traced (exact: what Python, NumPy and native code (malloc)*"])

    # Under xdist: each worker holds the hooks for its session; the figures are the same.
    result = pytester.runpytest("--memprof", "--memprof-native", "-n", "2")
    result.assert_outcomes(passed=1, failed=1)
    data = json.loads((pytester.path / ".memgauge/results.json").read_text())
    assert data["environment"]["key"].endswith("+native")
    twenty = data["tests"]["test_c.py::test_twenty_mib_from_c"]
    assert within(twenty["peak_bytes"], 20 * MiB), twenty["peak_bytes"]

    # Off (the default, or --no-memprof-native): C's blocks are not in the traced figures.
    result = pytester.runpytest("--memprof", "--memprof-native", "--no-memprof-native")
    result.assert_outcomes(passed=2)
    data = json.loads((pytester.path / ".memgauge/results.json").read_text())
    assert not data["environment"]["key"].endswith("+native")
    assert data["environment"]["traced"] == ["python", "numpy"]
    assert data["tests"]["test_c.py::test_twenty_mib_from_c"]["peak_bytes"] < MiB


ARROW_SUITE = """
import json
import os

import pyarrow as pa


def test_an_arrow_array():
    pool = pa.default_memory_pool()
    before = pool.max_memory()
    array = pa.array(range(10_000_000), type=pa.int64())
    arrow_peak = pool.max_memory()
    del array
    with open(os.environ["ARROW_OUT"], "w") as out:
        json.dump({"backend": pool.backend_name, "before": before, "peak": arrow_peak}, out)
"""


def test_pyarrow_buffers_are_counted_as_arrow_counts_them(
    pytester: pytest.Pytester, tmp_path, monkeypatch
):
    import json

    pytest.importorskip("pyarrow")
    pytester.makepyfile(test_arrow=ARROW_SUITE)
    out = tmp_path / "arrow.json"
    # A process of its own: Arrow reads its pool setting once, at first use.
    monkeypatch.setenv("ARROW_OUT", str(out))
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    result = pytester.runpytest_subprocess("--memprof", "--memprof-native")
    result.assert_outcomes(passed=1)
    arrow = json.loads(out.read_text())
    # memgauge chose Arrow's system pool (its default, jemalloc or mimalloc, is private to
    # libarrow and would not be seen), and says so.
    assert arrow["backend"] == "system"
    data = json.loads((pytester.path / ".memgauge/results.json").read_text())
    assert data["environment"]["arrow_memory_pool"] == "system"
    # Arrow's own peak: the builder's buffers, grown by doubling, for 80 MB of int64.
    arrow_peak = arrow["peak"] - arrow["before"]
    assert arrow_peak >= 80_000_000
    peak = data["tests"]["test_arrow.py::test_an_arrow_array"]["peak_bytes"]
    assert within(peak, arrow_peak, 0.05), (peak, arrow_peak)
