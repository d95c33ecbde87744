//! Native allocations: the malloc family as every loaded object calls it (C extensions, their
//! libraries, ctypes), through hooks written into the objects' GOT slots ([`got`](super::got)).
//! Linux on x86_64.
//!
//! The hooks go through the same gate as CPython's domains ([`traced_alloc`] and friends), so
//! one busy flag covers every layer: a block that `PyMem_RawMalloc` or NumPy's handler asks
//! `malloc` for is counted once, by the outer hook, and the engine's own allocations (from
//! memgauge's library, never patched) are not seen at all. A thread without the GIL queues its
//! events, as the raw domain's do. `errno` is what the caller would see without the hooks: its
//! own value into the real call, the real function's out of the hook (see `Errno`).
//!
//! Objects loaded later: `dlopen` is interposed by a two-instruction trampoline that notes the
//! load and jumps to the real `dlopen`, so the loader still sees the caller's return address
//! (glibc searches the caller's RUNPATH for a bare name). The next claim on the engine patches
//! the new objects. `dlsym` is interposed so that a lookup of `malloc` in a handle (ctypes,
//! cffi) returns the hook; `dlsym(RTLD_NEXT, …)` and `dlsym(RTLD_DEFAULT, …)` jump straight to
//! the real one, whose answer depends on who called it.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use super::got::{Interposed, Patches};
use super::hooks::{traced_alloc, traced_free, traced_realloc};
use super::runtime::{HAS_PENDING_OFFSET, NATIVE_OFFSET, RUNTIME};

const MALLOC: usize = 0;
const FREE: usize = 1;
const CALLOC: usize = 2;
const REALLOC: usize = 3;
const REALLOCARRAY: usize = 4;
const POSIX_MEMALIGN: usize = 5;
const ALIGNED_ALLOC: usize = 6;
const MEMALIGN: usize = 7;
const VALLOC: usize = 8;
const PVALLOC: usize = 9;
const FREE_SIZED: usize = 10;
const FREE_ALIGNED_SIZED: usize = 11;
/// The allocating functions end here; the loader's two follow.
const ALLOCATORS: usize = 12;
const DLOPEN: usize = 12;
const DLSYM: usize = 13;
const FUNCTIONS: usize = 14;

const NAMES: [&CStr; FUNCTIONS] = [
    c"malloc",
    c"free",
    c"calloc",
    c"realloc",
    c"reallocarray",
    c"posix_memalign",
    c"aligned_alloc",
    c"memalign",
    c"valloc",
    c"pvalloc",
    c"free_sized",
    c"free_aligned_sized",
    c"dlopen",
    c"dlsym",
];

/// The native hooks' part of the runtime.
pub(super) struct NativePatch {
    /// The functions' definitions, which the hooks call (0: not found, or not in this libc;
    /// see [`got`](super::got) on the two addresses of a function). Found once and kept: a hook
    /// handed out by `dlsym` may be called after the slots are restored.
    real: [AtomicUsize; FUNCTIONS],
    /// Their canonical addresses, what `dlsym` answers.
    canonical: [AtomicUsize; FUNCTIONS],
    /// Whether the slots hold the hooks.
    installed: AtomicBool,
    /// Counted by the `dlopen` trampoline (which sets the runtime's `has_pending` too, so that
    /// the next claim looks), and the count the last look was for: objects may have been loaded.
    dlopens: AtomicU64,
    dlopens_seen: AtomicU64,
    /// Looks since `dlopens_seen` that found no object added: the trampoline runs as `dlopen`
    /// starts, so a claim made inside it (libc allocates there) may look before the object is
    /// in the loader's list, and later claims look again, up to [`LOOKS_AFTER_A_DLOPEN`].
    looks: AtomicU32,
    /// Holds that keep the hooks in while no scope is open (the pytest plugin's, for its
    /// session: each test's scope then finds them in, and ctypes' lookups made at import get
    /// the hooks).
    holds: AtomicUsize,
    patches: Mutex<Option<Patches>>,
}

impl NativePatch {
    #[allow(clippy::declare_interior_mutable_const)]
    pub(super) const UNSET: NativePatch = NativePatch {
        real: [const { AtomicUsize::new(0) }; FUNCTIONS],
        canonical: [const { AtomicUsize::new(0) }; FUNCTIONS],
        installed: AtomicBool::new(false),
        dlopens: AtomicU64::new(0),
        dlopens_seen: AtomicU64::new(0),
        looks: AtomicU32::new(0),
        holds: AtomicUsize::new(0),
        patches: Mutex::new(None),
    };
}

/// Where the trampolines find their statics: offsets into the runtime.
pub(super) const DLOPENS_OFFSET: usize = std::mem::offset_of!(NativePatch, dlopens);

/// How many claims look for the objects of a `dlopen` that added none (a library loaded
/// already: nothing to patch) before they stop: a few microseconds each, in that one test.
const LOOKS_AFTER_A_DLOPEN: u32 = 1000;
pub(super) const REAL_OFFSET: usize = std::mem::offset_of!(NativePatch, real);

#[inline(always)]
fn real(function: usize) -> usize {
    RUNTIME.native.real[function].load(Relaxed)
}

macro_rules! real_fn {
    ($function:expr, $type:ty) => {
        // SAFETY: the table holds this function's address (the hook is only patched in, or
        // handed out, once it was resolved), of the C signature `$type`.
        unsafe { std::mem::transmute::<usize, $type>(real($function)) }
    };
}

/// `errno` as a hook's caller sees it: what it was when the hook was called, until the real
/// function runs, and what the real function left in it after (the engine's bookkeeping around
/// the call makes system calls now and then). Put back when dropped.
struct Errno {
    location: *mut c_int,
    value: Cell<c_int>,
}

impl Errno {
    #[inline(always)]
    fn save() -> Errno {
        // SAFETY: errno's location is this thread's, valid for its life.
        let location = unsafe { libc::__errno_location() };
        Errno {
            location,
            // SAFETY: as above.
            value: Cell::new(unsafe { *location }),
        }
    }

    /// Around the real call: the caller's errno in, the function's out.
    #[inline(always)]
    fn around<R>(&self, call: impl FnOnce() -> R) -> R {
        // SAFETY: as in `save`.
        unsafe { *self.location = self.value.get() };
        let result = call();
        // SAFETY: as in `save`.
        self.value.set(unsafe { *self.location });
        result
    }
}

impl Drop for Errno {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: as in `save`.
        unsafe { *self.location = self.value.get() };
    }
}

/// A hook of a function that takes the size it allocates (`malloc`, `valloc`).
macro_rules! size_hook {
    ($name:ident, $function:expr) => {
        extern "C" fn $name(size: usize) -> *mut c_void {
            let allocate = real_fn!($function, unsafe extern "C" fn(usize) -> *mut c_void);
            let errno = Errno::save();
            // SAFETY: the real function, with the caller's argument.
            traced_alloc(size, false, || errno.around(|| unsafe { allocate(size) }))
        }
    };
}

size_hook!(hook_malloc, MALLOC);
size_hook!(hook_valloc, VALLOC);

extern "C" fn hook_calloc(count: usize, size: usize) -> *mut c_void {
    let calloc = real_fn!(CALLOC, unsafe extern "C" fn(usize, usize) -> *mut c_void);
    let errno = Errno::save();
    traced_alloc(count.saturating_mul(size), false, || {
        // SAFETY: the real calloc, with the caller's arguments.
        errno.around(|| unsafe { calloc(count, size) })
    })
}

extern "C" fn hook_realloc(old: *mut c_void, size: usize) -> *mut c_void {
    let realloc = real_fn!(
        REALLOC,
        unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void
    );
    let errno = Errno::save();
    traced_realloc(old, size, false, || {
        // SAFETY: the real realloc, with the caller's arguments.
        errno.around(|| unsafe { realloc(old, size) })
    })
}

extern "C" fn hook_reallocarray(old: *mut c_void, count: usize, size: usize) -> *mut c_void {
    let reallocarray = real_fn!(
        REALLOCARRAY,
        unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void
    );
    let errno = Errno::save();
    // An overflowing size fails in the real function, and the old block stays.
    traced_realloc(old, count.saturating_mul(size), false, || {
        // SAFETY: the real reallocarray, with the caller's arguments.
        errno.around(|| unsafe { reallocarray(old, count, size) })
    })
}

extern "C" fn hook_posix_memalign(out: *mut *mut c_void, alignment: usize, size: usize) -> c_int {
    let posix_memalign = real_fn!(
        POSIX_MEMALIGN,
        unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int
    );
    let errno = Errno::save();
    let status = Cell::new(0);
    traced_alloc(size, false, || {
        // SAFETY: the real posix_memalign, with the caller's arguments.
        let result = errno.around(|| unsafe { posix_memalign(out, alignment, size) });
        status.set(result);
        if result == 0 {
            // SAFETY: on success the real function wrote the block to the caller's `out`.
            unsafe { *out }
        } else {
            std::ptr::null_mut()
        }
    });
    status.get()
}

macro_rules! aligned_hook {
    ($name:ident, $function:expr) => {
        extern "C" fn $name(alignment: usize, size: usize) -> *mut c_void {
            let allocate = real_fn!($function, unsafe extern "C" fn(usize, usize) -> *mut c_void);
            let errno = Errno::save();
            traced_alloc(size, false, || {
                // SAFETY: the real function, with the caller's arguments.
                errno.around(|| unsafe { allocate(alignment, size) })
            })
        }
    };
}

aligned_hook!(hook_aligned_alloc, ALIGNED_ALLOC);
aligned_hook!(hook_memalign, MEMALIGN);

extern "C" fn hook_pvalloc(size: usize) -> *mut c_void {
    let pvalloc = real_fn!(PVALLOC, unsafe extern "C" fn(usize) -> *mut c_void);
    // pvalloc rounds the size up to whole pages, which the caller may use.
    let page = super::page_size() as usize;
    let rounded = size.max(1).div_ceil(page).saturating_mul(page);
    let errno = Errno::save();
    // SAFETY: the real pvalloc, with the caller's argument.
    traced_alloc(rounded, false, || errno.around(|| unsafe { pvalloc(size) }))
}

extern "C" fn hook_free(address: *mut c_void) {
    let free = real_fn!(FREE, unsafe extern "C" fn(*mut c_void));
    // POSIX: free leaves errno alone, and so does the bookkeeping around it.
    let errno = Errno::save();
    // SAFETY: the real free, with the caller's block.
    traced_free(address, false, || errno.around(|| unsafe { free(address) }))
}

extern "C" fn hook_free_sized(address: *mut c_void, size: usize) {
    let free_sized = real_fn!(FREE_SIZED, unsafe extern "C" fn(*mut c_void, usize));
    let errno = Errno::save();
    traced_free(address, false, || {
        // SAFETY: the real free_sized, with the caller's arguments.
        errno.around(|| unsafe { free_sized(address, size) })
    })
}

extern "C" fn hook_free_aligned_sized(address: *mut c_void, alignment: usize, size: usize) {
    let free_aligned_sized = real_fn!(
        FREE_ALIGNED_SIZED,
        unsafe extern "C" fn(*mut c_void, usize, usize)
    );
    let errno = Errno::save();
    traced_free(address, false, || {
        // SAFETY: the real free_aligned_sized, with the caller's arguments.
        errno.around(|| unsafe { free_aligned_sized(address, alignment, size) })
    })
}

/// `dlsym` in a handle (the trampoline sends `RTLD_NEXT` and `RTLD_DEFAULT` to the real one):
/// the real lookup, which does not depend on who asks, with an allocating function answered by
/// its hook while the hooks are in.
extern "C" fn dlsym_mapped(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let dlsym = real_fn!(
        DLSYM,
        unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void
    );
    // SAFETY: the real dlsym, with the caller's arguments.
    let found = unsafe { dlsym(handle, name) };
    if found.is_null() || !RUNTIME.native.installed.load(Relaxed) {
        return found;
    }
    let hooks = hooks();
    let canonical = &RUNTIME.native.canonical;
    (0..ALLOCATORS)
        .find(|&function| {
            // A hook whose definition is not known yet would have nothing to call.
            real(function) != 0
                && (real(function) == found as usize
                    || canonical[function].load(Relaxed) == found as usize)
        })
        .map_or(found, |function| hooks[function] as *mut c_void)
}

// The trampolines: `dlopen` notes that objects may have changed and jumps on; `dlsym` sends
// RTLD_NEXT (-1) and RTLD_DEFAULT (0), whose answers depend on the caller's place and scope, to
// the real one, and a lookup in a handle (ctypes' and cffi's) to `dlsym_mapped`. r11 is the
// scratch register the ABI leaves to a call's glue (a PLT stub uses it too). Hidden: not
// exported by the module.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.memgauge_native_trampolines,\"ax\",@progbits",
    ".globl memgauge_native_dlopen",
    ".hidden memgauge_native_dlopen",
    ".type memgauge_native_dlopen,@function",
    ".p2align 4",
    "memgauge_native_dlopen:",
    "mov r11, qword ptr [rip + {runtime}@GOTPCREL]",
    "lock inc qword ptr [r11 + {dlopens}]",
    "mov byte ptr [r11 + {pending}], 1",
    "jmp qword ptr [r11 + {real_dlopen}]",
    ".size memgauge_native_dlopen, .-memgauge_native_dlopen",
    ".globl memgauge_native_dlsym",
    ".hidden memgauge_native_dlsym",
    ".type memgauge_native_dlsym,@function",
    ".p2align 4",
    "memgauge_native_dlsym:",
    "cmp rdi, -1",
    "je 2f",
    "test rdi, rdi",
    "je 2f",
    "jmp {dlsym_mapped}@PLT",
    "2:",
    "mov r11, qword ptr [rip + {runtime}@GOTPCREL]",
    "jmp qword ptr [r11 + {real_dlsym}]",
    ".size memgauge_native_dlsym, .-memgauge_native_dlsym",
    ".popsection",
    runtime = sym RUNTIME,
    dlopens = const NATIVE_OFFSET + DLOPENS_OFFSET,
    pending = const HAS_PENDING_OFFSET,
    real_dlopen = const NATIVE_OFFSET + REAL_OFFSET + DLOPEN * 8,
    real_dlsym = const NATIVE_OFFSET + REAL_OFFSET + DLSYM * 8,
    dlsym_mapped = sym dlsym_mapped,
);

extern "C" {
    /// The trampolines above: only their addresses are taken, to write into slots.
    fn memgauge_native_dlopen();
    fn memgauge_native_dlsym();
}

/// An address in memgauge's own library, by which a walk knows it.
fn own_address() -> usize {
    hook_malloc as *const () as usize
}

/// The hooks, in the order of [`NAMES`].
fn hooks() -> [usize; FUNCTIONS] {
    [
        hook_malloc as *const () as usize,
        hook_free as *const () as usize,
        hook_calloc as *const () as usize,
        hook_realloc as *const () as usize,
        hook_reallocarray as *const () as usize,
        hook_posix_memalign as *const () as usize,
        hook_aligned_alloc as *const () as usize,
        hook_memalign as *const () as usize,
        hook_valloc as *const () as usize,
        hook_pvalloc as *const () as usize,
        hook_free_sized as *const () as usize,
        hook_free_aligned_sized as *const () as usize,
        memgauge_native_dlopen as *const () as usize,
        memgauge_native_dlsym as *const () as usize,
    ]
}

impl NativePatch {
    fn table(&self) -> [Interposed; FUNCTIONS] {
        let hooks = hooks();
        std::array::from_fn(|function| Interposed {
            name: NAMES[function],
            canonical: self.canonical[function].load(Relaxed),
            definition: self.real[function].load(Relaxed),
            hook: hooks[function],
            loader_calls_it: function < ALLOCATORS,
        })
    }

    /// Puts the hooks in every loaded object's slots (again, for objects loaded since).
    /// Returns how many slots were written, or None when a function the hooks need has no
    /// definition to call.
    ///
    /// Called by the GIL holder with its allocations untraced.
    pub(super) fn install(&self) -> Option<usize> {
        if self.canonical[MALLOC].load(Relaxed) == 0 {
            for (function, name) in NAMES.iter().enumerate() {
                // SAFETY: a lookup in the global scope, by a NUL-terminated name.
                let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                self.canonical[function].store(address as usize, Relaxed);
            }
        }
        // Whatever `dlopen` added so far is patched below.
        let dlopens = self.dlopens.load(Relaxed);
        let mut table = self.table();
        let mut patches = self.patches.lock().unwrap_or_else(|e| e.into_inner());
        let patches = patches.get_or_insert_with(Patches::default);
        // SAFETY: the table is the same every time, and the lock makes one patcher at a time.
        unsafe { patches.walk_if_changed(&table, own_address()) };
        patches.find_definitions(&mut table);
        for (function, entry) in table.iter_mut().enumerate() {
            // A definition, once found, stays: hooks may be running on it.
            let known = self.real[function].load(Relaxed);
            if known == 0 && entry.definition != 0 {
                self.real[function].store(entry.definition, Relaxed);
            } else {
                entry.definition = known;
            }
        }
        self.dlopens_seen.store(dlopens, Relaxed);
        self.looks.store(0, Relaxed);
        // The hooks need these; the rest are patched where they exist.
        let needed = [MALLOC, FREE, CALLOC, REALLOC, DLOPEN, DLSYM];
        if needed
            .iter()
            .any(|&function| table[function].definition == 0)
        {
            return None;
        }
        // SAFETY: each hook has its function's signature, and the definitions were found by
        // the walk the slots come from.
        let written = unsafe { patches.patch(&table) };
        self.installed.store(true, Relaxed);
        Some(written)
    }

    /// After a `dlopen`: patches the objects it added, if the hooks are in. Returns whether a
    /// later claim should look again (the `dlopen` may still be running, or another started).
    pub(super) fn refresh(&self) -> bool {
        if !self.installed.load(Relaxed)
            || self.dlopens.load(Relaxed) == self.dlopens_seen.load(Relaxed)
        {
            return false;
        }
        let dlopens = self.dlopens.load(Relaxed);
        let looks = self.looks.load(Relaxed) + 1;
        if self.with_patches(|patches| patches.is_current()) && looks < LOOKS_AFTER_A_DLOPEN {
            self.looks.store(looks, Relaxed);
            return true;
        }
        // Objects were added (or, after all those looks, it was a library loaded already).
        self.install();
        // A `dlopen` that started meanwhile is looked at by the next claim.
        self.dlopens.load(Relaxed) != dlopens
    }

    /// Writes every patched slot back as it was.
    pub(super) fn uninstall(&self) {
        if !self.installed.swap(false, Relaxed) {
            return;
        }
        let table = self.table();
        // SAFETY: as in `install`.
        self.with_patches(|patches| unsafe { patches.restore(&table) });
    }

    /// Takes (`true`) or gives back a hold; returns whether one is left. Taking one installs
    /// the hooks; the runtime takes them out when the last hold goes and no scope needs them.
    pub(super) fn hold(&self, take: bool) -> bool {
        if take {
            self.holds.fetch_add(1, Relaxed);
            self.install();
            return true;
        }
        let before = self
            .holds
            .fetch_update(Relaxed, Relaxed, |holds| holds.checked_sub(1))
            .unwrap_or(0);
        before > 1
    }

    /// Runs `f` on the patches (made if there are none yet), under their lock.
    fn with_patches<R>(&self, f: impl FnOnce(&mut Patches) -> R) -> R {
        let mut patches = self.patches.lock().unwrap_or_else(|e| e.into_inner());
        f(patches.get_or_insert_with(Patches::default))
    }

    /// Whether a hold keeps the hooks in.
    pub(super) fn held(&self) -> bool {
        self.holds.load(Relaxed) > 0
    }

    /// Whether the hooks are in.
    pub(super) fn installed(&self) -> bool {
        self.installed.load(Relaxed)
    }

    /// The loaded objects' slots for the interposed functions, each with whether it holds the
    /// real function or its own lazy stub (not a hook): for the test that a restore is whole.
    pub(super) fn slots_hold_hooks(&self) -> (usize, usize) {
        let table = self.table();
        let values = self.with_patches(|patches| {
            // SAFETY: as in `install`: a walk to find the slots, nothing written.
            unsafe { patches.walk_if_changed(&table, own_address()) };
            patches.slot_values()
        });
        let hooks = hooks();
        let hooked = values
            .iter()
            .filter(|(_, value)| hooks.contains(value))
            .count();
        (values.len(), hooked)
    }
}
