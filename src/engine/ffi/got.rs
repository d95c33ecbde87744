//! The calls loaded ELF objects make to the malloc family, rerouted: each object calls a
//! function of another through a slot of its global offset table, which the dynamic loader
//! filled in; writing a hook's address into the slot makes that object's calls go to the hook.
//! No `LD_PRELOAD` needed, so it works in a process that is already running (pytest).
//!
//! Two addresses name a function. Its definition (in libc, or a preloaded allocator) is where
//! calls end. Its canonical address is what `dlsym` answers and what a function pointer holds:
//! the definition, except when a non-PIE executable takes the function's address (Debian's and
//! Ubuntu's `python3`), which makes an entry of that executable's PLT the canonical address, a
//! jump through the executable's own slot. So the definition is read from that slot; the hooks
//! call the definition, never the canonical address. That slot is never patched: the dynamic
//! loader calls `malloc` through the canonical entry, and no hook may run inside the loader.
//!
//! A slot is patched only when it holds one of the two or, bound lazily, still points into its
//! own object's PLT: a slot that holds something else belongs to an object with an allocator of
//! its own, which is left alone. Every patched slot's value from before is kept and written back
//! on [`Patches::restore`], with its page's protection as it was. The dynamic loader and the vdso
//! are never patched (the loader allocates for itself). memgauge's own library gets the
//! definitions in its slots rather than hooks, so its own allocations never meet a hook, even
//! through an executable's canonical entry.

#![cfg_attr(not(feature = "python"), allow(dead_code))]

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::Release};

use object::elf;
use object::NativeEndian as NE;

/// A function the hooks interpose: its name, its canonical address (what `dlsym` answers; 0 when
/// the global scope has none), its definition (0 until found, see [`Patches::find_definitions`]),
/// the hook, and whether the dynamic loader may call it (the malloc family).
#[derive(Clone, Copy)]
pub(super) struct Interposed {
    pub(super) name: &'static CStr,
    pub(super) canonical: usize,
    pub(super) definition: usize,
    pub(super) hook: usize,
    pub(super) loader_calls_it: bool,
}

/// One slot found in a walk of the loaded objects.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot {
    address: usize,
    /// The index of its function in the [`Interposed`] table.
    function: usize,
    /// The bounds of its object's mapped segments.
    object: (usize, usize),
    /// Whether it lies in the object's RELRO range, made read-only after relocation: its
    /// page's protection is looked at when it is written.
    relro: bool,
    /// Whether the slot may be bound lazily: a PLT slot of a function the object does not
    /// define, whose value points into the object's own PLT until the first call.
    lazy: bool,
    /// A slot of memgauge's own library: given the definition, not the hook.
    own: bool,
}

impl Slot {
    /// Whether the slot is of the object whose PLT holds the function's canonical entry (a
    /// non-PIE executable's) and the loader calls the function: that entry jumps through the
    /// slot, and the dynamic loader calls `malloc` through that entry, so the slot is never
    /// patched and no hook runs inside the loader. The executable's own calls to the function
    /// go untraced (CPython's go through the raw domain, traced there).
    fn behind_the_canonical_entry(&self, function: &Interposed) -> bool {
        !self.own
            && function.loader_calls_it
            && function.canonical != function.definition
            && (self.object.0..self.object.1).contains(&function.canonical)
    }

    /// What memgauge writes into the slot: the hook, or, in memgauge's own library, the
    /// definition.
    fn ours(&self, function: &Interposed) -> usize {
        if self.own {
            function.definition
        } else {
            function.hook
        }
    }

    /// Whether the value is the slot's own lazy binding (its object's PLT, not yet called).
    fn unbound(&self, value: usize) -> bool {
        self.lazy && (self.object.0..self.object.1).contains(&value)
    }
}

/// The slots patched now, and what the last walk found.
#[derive(Default)]
pub(super) struct Patches {
    /// The slots of the last walk (sorted by address), and the loader's (adds, subs) counters
    /// then.
    slots: Vec<Slot>,
    walked: Option<(u64, u64)>,
    /// Each patched slot's value from before.
    originals: HashMap<usize, usize>,
}

impl Patches {
    /// Whether the last walk saw the objects loaded now (the loader added and removed none
    /// since).
    pub(super) fn is_current(&self) -> bool {
        self.walked == Some(loader_counters())
    }

    /// Walks the loaded objects if one was loaded or unloaded since the last walk.
    ///
    /// # Safety
    /// `functions` is the same table each time. Called by one thread at a time.
    pub(super) unsafe fn walk_if_changed(&mut self, functions: &[Interposed], own: usize) {
        let counters = loader_counters();
        if self.walked == Some(counters) {
            return;
        }
        // SAFETY: as the caller promised.
        self.slots = unsafe { walk(functions, own) };
        self.walked = Some(counters);
        // Objects unloaded since: their slots are gone with them.
        let current: std::collections::HashSet<usize> =
            self.slots.iter().map(|slot| slot.address).collect();
        self.originals
            .retain(|address, _| current.contains(address));
    }

    /// Fills in the definition of each function that has none yet: its canonical address,
    /// unless that is an entry of an object's PLT (an object that does not define the function
    /// and whose mapped range holds the address), whose slot then holds the definition. A
    /// function whose definition cannot be read (that slot is not bound yet) keeps 0 and is not
    /// patched.
    pub(super) fn find_definitions(&self, functions: &mut [Interposed]) {
        // The slot behind each canonical PLT entry, by function.
        let mut entries = HashMap::new();
        for (index, function) in functions.iter_mut().enumerate() {
            if function.definition != 0 || function.canonical == 0 {
                continue;
            }
            let canonical = function.canonical;
            let entry_of = self.slots.iter().find(|slot| {
                slot.function == index
                    && slot.lazy
                    && !slot.own
                    && (slot.object.0..slot.object.1).contains(&canonical)
            });
            match entry_of {
                None => function.definition = canonical,
                Some(slot) => {
                    entries.insert(slot.address, index);
                }
            }
        }
        if entries.is_empty() {
            return;
        }
        // SAFETY: reads only, of slots of objects the loader holds loaded meanwhile.
        unsafe {
            self.for_each_loaded(|slot| {
                if let Some(&index) = entries.get(&slot.address) {
                    let bound = read_slot(slot.address);
                    // Not bound yet: the function keeps 0 (so does one whose object is gone).
                    if !slot.unbound(bound) {
                        functions[index].definition = bound;
                    }
                }
            })
        };
    }

    /// Writes the hooks into every slot that calls one of `functions` (and the definitions into
    /// memgauge's own slots), as the last walk found them. Returns how many slots were written.
    ///
    /// # Safety
    /// Each hook has the signature of its function, the definitions are those
    /// [`Patches::find_definitions`] found, and `functions` is the table of the last walk.
    pub(super) unsafe fn patch(&mut self, functions: &[Interposed]) -> usize {
        let mut originals = std::mem::take(&mut self.originals);
        let mut writes = 0;
        // SAFETY: each slot is read and written while the loader holds its object loaded; each
        // write puts a hook of the slot's function, or its definition, in it.
        unsafe {
            self.for_each_object(|slots| {
                let mut batch = Vec::new();
                for slot in slots {
                    let function = &functions[slot.function];
                    if function.definition == 0 || slot.behind_the_canonical_entry(function) {
                        continue;
                    }
                    let target = slot.ours(function);
                    let value = read_slot(slot.address);
                    if value == target {
                        continue;
                    }
                    let calls_it = value == function.definition || value == function.canonical;
                    if !calls_it && !slot.unbound(value) {
                        continue; // An allocator of the object's own.
                    }
                    // What the slot holds now is what goes back (a slot at this address before
                    // was of an object unloaded since).
                    originals.insert(slot.address, value);
                    batch.push((*slot, target));
                }
                writes += batch.len();
                write_slots(&batch);
            })
        };
        self.originals = originals;
        writes
    }

    /// Writes back every patched slot that still holds what we wrote (another tool that patched
    /// it since keeps its own).
    ///
    /// # Safety
    /// As [`Patches::patch`].
    pub(super) unsafe fn restore(&mut self, functions: &[Interposed]) {
        if self.originals.is_empty() {
            return;
        }
        let originals = std::mem::take(&mut self.originals);
        // SAFETY: each slot is read and written while the loader holds its object loaded; each
        // write puts back the value the slot had before we patched it.
        unsafe {
            self.for_each_object(|slots| {
                let mut batch = Vec::new();
                for slot in slots {
                    let Some(&original) = originals.get(&slot.address) else {
                        continue;
                    };
                    if read_slot(slot.address) == slot.ours(&functions[slot.function]) {
                        batch.push((*slot, original));
                    }
                }
                write_slots(&batch);
            })
        };
    }

    /// Every slot of the last walk but memgauge's own, with its value now: for the test that
    /// all were restored.
    pub(super) fn slot_values(&self) -> Vec<(usize, usize)> {
        let mut values = Vec::new();
        // SAFETY: reads only, of slots of objects the loader holds loaded meanwhile.
        unsafe {
            self.for_each_loaded(|slot| {
                if !slot.own {
                    values.push((slot.address, read_slot(slot.address)));
                }
            })
        };
        values
    }

    /// Runs `f` on each slot of the last walk whose object is still loaded, while the loader
    /// holds it so (inside `dl_iterate_phdr`, whose lock `dlclose` takes to unmap an object).
    ///
    /// # Safety
    /// `f` only reads and writes the slots it is given.
    unsafe fn for_each_loaded(&self, mut f: impl FnMut(&Slot)) {
        // SAFETY: as the caller promised.
        unsafe {
            self.for_each_object(|slots| {
                for slot in slots {
                    f(slot)
                }
            })
        }
    }

    /// Runs `f` on the slots of the last walk of each loaded object (by its mapped range),
    /// inside `dl_iterate_phdr`.
    ///
    /// # Safety
    /// As [`Patches::for_each_loaded`].
    unsafe fn for_each_object(&self, mut f: impl FnMut(&[Slot])) {
        struct Visit<'a> {
            slots: &'a [Slot],
            f: &'a mut dyn FnMut(&[Slot]),
        }
        unsafe extern "C" fn visit(
            info: *mut libc::dl_phdr_info,
            _size: usize,
            data: *mut c_void,
        ) -> c_int {
            // SAFETY: the loader passes a valid info of a loaded object, and `data` is the
            // visit below.
            let (info, visit) = unsafe { (&*info, &mut *data.cast::<Visit>()) };
            // SAFETY: as above.
            let Some(range) = (unsafe { mapped_range(info) }) else {
                return 0;
            };
            let from = visit.slots.partition_point(|slot| slot.address < range.0);
            let to = visit.slots.partition_point(|slot| slot.address < range.1);
            // The same object as walked, not another one mapped at its place since.
            let same = visit.slots[from..to]
                .iter()
                .all(|slot| slot.object == range);
            if from < to && same {
                (visit.f)(&visit.slots[from..to]);
            }
            0
        }
        let mut state = Visit {
            slots: &self.slots,
            f: &mut f,
        };
        // SAFETY: the callback reads the objects the loader lists, while it holds them loaded.
        unsafe { libc::dl_iterate_phdr(Some(visit), (&mut state as *mut Visit).cast()) };
    }
}

/// The loader's counters of objects added and removed since the process started.
pub(super) fn loader_counters() -> (u64, u64) {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid info; `data` is the counters below.
        unsafe {
            *data.cast::<(u64, u64)>() = ((*info).dlpi_adds, (*info).dlpi_subs);
        }
        1 // The first object is enough.
    }
    let mut counters = (0u64, 0u64);
    // SAFETY: the callback only writes the counters, which outlive the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut counters as *mut (u64, u64)).cast()) };
    counters
}

struct Walk<'a> {
    functions: &'a [Interposed],
    own: usize,
    slots: Vec<Slot>,
}

/// Every GOT slot, in every loaded object but the skipped ones, that a relocation binds to one
/// of `functions` by name.
///
/// # Safety
/// Called by one thread at a time (the loader's lock keeps objects from going meanwhile).
unsafe fn walk(functions: &[Interposed], own: usize) -> Vec<Slot> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid info of a loaded object, and `data` is the walk.
        unsafe { visit_object(&*info, &mut *data.cast::<Walk>()) };
        0
    }
    let mut walk = Walk {
        functions,
        own,
        slots: Vec::new(),
    };
    // SAFETY: the callback reads the objects the loader lists, while it holds them loaded.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut walk as *mut Walk).cast()) };
    walk.slots.sort_by_key(|slot| slot.address);
    walk.slots.dedup_by_key(|slot| slot.address);
    walk.slots
}

/// Objects never patched, by file name: the dynamic loader (which allocates for itself before
/// and while it loads objects) and the kernel's vdso.
fn skipped(name: &[u8]) -> bool {
    let file = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
    [
        "ld-linux",
        "ld-musl",
        "ld64.so",
        "ld.so",
        "linux-vdso",
        "linux-gate",
    ]
    .iter()
    .any(|prefix| file.starts_with(prefix.as_bytes()))
}

/// # Safety
/// `info` describes a loaded object, which stays loaded during the call.
unsafe fn visit_object(info: &libc::dl_phdr_info, walk: &mut Walk) {
    let base = info.dlpi_addr as usize;
    let name = if info.dlpi_name.is_null() {
        &[][..]
    } else {
        // SAFETY: the loader's names are NUL-terminated strings.
        unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
    };
    if skipped(name) {
        return;
    }
    // SAFETY: the caller's promise.
    let Some((start, end)) = (unsafe { mapped_range(info) }) else {
        return;
    };
    let mut dynamic = None;
    let mut relro = (0, 0);
    // SAFETY: the loader gives the program headers' address and count.
    for header in unsafe { headers(info) } {
        let from = base + header.p_vaddr as usize;
        let to = from + header.p_memsz as usize;
        match header.p_type {
            libc::PT_DYNAMIC => dynamic = Some(from),
            libc::PT_GNU_RELRO => relro = (from, to),
            _ => {}
        }
    }
    let own = (start..end).contains(&walk.own);
    let Some(dynamic) = dynamic else {
        return;
    };
    // SAFETY: the dynamic section of a loaded object, relocated by the loader.
    let Some(tables) = (unsafe { Tables::read(dynamic as *const elf::Dyn64<NE>, base) }) else {
        return;
    };
    for (table, size) in [tables.plt, tables.rela] {
        let count = size / std::mem::size_of::<elf::Rela64<NE>>();
        if table == 0 || count == 0 {
            continue;
        }
        // SAFETY: the loader mapped the table the dynamic section names, `size` bytes long.
        let relocations =
            unsafe { std::slice::from_raw_parts(table as *const elf::Rela64<NE>, count) };
        for relocation in relocations {
            if !binds_a_slot(relocation.r_type(NE, false)) {
                continue;
            }
            let symbol = relocation.r_sym(NE, false) as usize;
            // SAFETY: the relocation's symbol is an entry of the object's symbol table.
            let symbol = unsafe { &*(tables.symbols as *const elf::Sym64<NE>).add(symbol) };
            let offset = symbol.st_name.get(NE) as usize;
            if offset >= tables.strings_size {
                continue;
            }
            // SAFETY: its name is an offset into the string table, checked above.
            let symbol_name = unsafe { CStr::from_ptr((tables.strings + offset) as *const _) };
            let Some(function) = walk
                .functions
                .iter()
                .position(|f| f.canonical != 0 && f.name == symbol_name)
            else {
                continue;
            };
            let address = base + relocation.r_offset.get(NE) as usize;
            let undefined = symbol.st_shndx.get(NE) == elf::SHN_UNDEF;
            walk.slots.push(Slot {
                address,
                function,
                object: (start, end),
                relro: (relro.0..relro.1).contains(&address),
                lazy: undefined && is_plt_slot(relocation.r_type(NE, false)),
                own,
            });
        }
    }
}

/// Whether a relocation type is a PLT slot's, which the loader may bind lazily.
fn is_plt_slot(kind: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    return kind == elf::R_X86_64_JUMP_SLOT;
    #[cfg(target_arch = "aarch64")]
    return kind == elf::R_AARCH64_JUMP_SLOT;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return {
        let _ = kind;
        false
    };
}

/// A loaded object's program headers.
///
/// # Safety
/// `info` describes a loaded object, which stays loaded while the headers are used.
unsafe fn headers(info: &libc::dl_phdr_info) -> &[libc::Elf64_Phdr] {
    if info.dlpi_phdr.is_null() {
        return &[];
    }
    // SAFETY: the loader gives the program headers' address and count.
    unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) }
}

/// The bounds of a loaded object's mapped segments (its `PT_LOAD`s).
///
/// # Safety
/// As [`headers`].
unsafe fn mapped_range(info: &libc::dl_phdr_info) -> Option<(usize, usize)> {
    let base = info.dlpi_addr as usize;
    let (mut start, mut end) = (usize::MAX, 0);
    // SAFETY: the caller's promise.
    for header in unsafe { headers(info) } {
        if header.p_type == libc::PT_LOAD {
            let from = base + header.p_vaddr as usize;
            (start, end) = (start.min(from), end.max(from + header.p_memsz as usize));
        }
    }
    (start < end).then_some((start, end))
}

/// Whether a relocation type fills a GOT slot with a function's address: a PLT slot
/// (`JUMP_SLOT`, called through) or a GOT entry (`GLOB_DAT`, as `-fno-plt` calls through, or a
/// function pointer taken).
fn binds_a_slot(kind: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    return kind == elf::R_X86_64_JUMP_SLOT || kind == elf::R_X86_64_GLOB_DAT;
    #[cfg(target_arch = "aarch64")]
    return kind == elf::R_AARCH64_JUMP_SLOT || kind == elf::R_AARCH64_GLOB_DAT;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return {
        let _ = kind;
        false
    };
}

/// Where an object's relocation, symbol and string tables are.
struct Tables {
    plt: (usize, usize),
    rela: (usize, usize),
    symbols: usize,
    strings: usize,
    strings_size: usize,
}

impl Tables {
    /// # Safety
    /// `dynamic` is a loaded object's dynamic section, ended by `DT_NULL`.
    unsafe fn read(mut dynamic: *const elf::Dyn64<NE>, base: usize) -> Option<Tables> {
        // The loader relocates the addresses in place, except in a few objects (the vdso):
        // an address below the base is still relative to it.
        let address = |value: u64| {
            let value = value as usize;
            if value < base {
                value + base
            } else {
                value
            }
        };
        let mut tables = Tables {
            plt: (0, 0),
            rela: (0, 0),
            symbols: 0,
            strings: 0,
            strings_size: 0,
        };
        let mut plt_is_rela = true;
        loop {
            // SAFETY: the caller's promise; the loop stops at DT_NULL.
            let entry = unsafe { &*dynamic };
            let (tag, value) = (entry.d_tag.get(NE) as u32, entry.d_val.get(NE));
            match tag {
                elf::DT_NULL => break,
                elf::DT_JMPREL => tables.plt.0 = address(value),
                elf::DT_PLTRELSZ => tables.plt.1 = value as usize,
                elf::DT_PLTREL => plt_is_rela = value == u64::from(elf::DT_RELA),
                elf::DT_RELA => tables.rela.0 = address(value),
                elf::DT_RELASZ => tables.rela.1 = value as usize,
                elf::DT_SYMTAB => tables.symbols = address(value),
                elf::DT_STRTAB => tables.strings = address(value),
                elf::DT_STRSZ => tables.strings_size = value as usize,
                _ => {}
            }
            // SAFETY: not past DT_NULL.
            dynamic = unsafe { dynamic.add(1) };
        }
        if !plt_is_rela {
            tables.plt = (0, 0); // REL relocations: not used on the 64-bit targets we patch.
        }
        (tables.symbols != 0 && tables.strings != 0).then_some(tables)
    }
}

/// # Safety
/// `address` is an aligned word of a loaded object.
unsafe fn read_slot(address: usize) -> usize {
    // SAFETY: the caller's promise; the loader and other patchers write it whole.
    unsafe { (*(address as *const AtomicUsize)).load(Relaxed) }
}

/// Writes each value into its slot (`writes` sorted by slot). A slot in the RELRO range has its
/// page's protection looked at as it is written: a write that the kernel refuses
/// (`process_vm_writev` into our own memory fails on a read-only page, where a store would
/// fault) is made with the page writable, and the page read-only again; a page already
/// writable (an object the loader has not finished relocating) stays as it is.
///
/// # Safety
/// Each slot is an aligned word of a loaded object's GOT, which stays loaded during the call,
/// and its value a function of the signature the slot's callers expect.
unsafe fn write_slots(writes: &[(Slot, usize)]) {
    let page_size = super::page_size() as usize;
    let page_of = |slot: &Slot| slot.address & !(page_size - 1);
    let mut maps = None;
    for same_page in writes.chunk_by(|(a, _), (b, _)| page_of(a) == page_of(b)) {
        let (first, value) = same_page[0];
        let page = page_of(&first);
        let mut rest = same_page;
        let read_only = if first.relro {
            match write_checked(first.address, value) {
                Ok(()) => {
                    rest = &same_page[1..];
                    false
                }
                Err(libc::EFAULT) => true,
                // The call is not allowed here (seccomp): the kernel's map says.
                Err(_) => {
                    let writable = maps.get_or_insert_with(|| {
                        std::fs::read_to_string("/proc/self/maps")
                            .map(|text| writable_ranges(&text))
                            .unwrap_or_default()
                    });
                    !is_writable(writable, page)
                }
            }
        } else {
            false
        };
        if read_only {
            // SAFETY: the page is mapped (it holds the slots); only its protection changes.
            let made = unsafe {
                libc::mprotect(
                    page as *mut c_void,
                    page_size,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if made != 0 {
                continue; // Left as they were: that object's calls stay untraced.
            }
        }
        for (slot, value) in rest {
            // SAFETY: the caller's promise; the page is writable now.
            unsafe { (*(slot.address as *const AtomicUsize)).store(*value, Release) };
        }
        if read_only {
            // SAFETY: as above; back to the RELRO protection it had.
            unsafe { libc::mprotect(page as *mut c_void, page_size, libc::PROT_READ) };
        }
    }
}

/// Writes `value` at `address` through the kernel, which refuses (EFAULT) where the page is not
/// writable instead of faulting; another errno where the call itself is not allowed.
fn write_checked(address: usize, value: usize) -> Result<(), c_int> {
    let local = libc::iovec {
        iov_base: &value as *const usize as *mut c_void,
        iov_len: std::mem::size_of::<usize>(),
    };
    let remote = libc::iovec {
        iov_base: address as *mut c_void,
        iov_len: std::mem::size_of::<usize>(),
    };
    // SAFETY: both vectors describe one word; the kernel checks the remote one.
    let written = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    if written == std::mem::size_of::<usize>() as isize {
        return Ok(());
    }
    // SAFETY: errno's location is this thread's.
    Err(unsafe { *libc::__errno_location() })
}

/// The writable mappings in `/proc/self/maps` text, sorted, as (start, end).
fn writable_ranges(maps: &str) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let permissions = fields.next()?;
            (permissions.as_bytes().get(1) == Some(&b'w')).then_some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect();
    ranges.sort_unstable();
    ranges
}

fn is_writable(ranges: &[(usize, usize)], page: usize) -> bool {
    let index = ranges.partition_point(|&(start, _)| start <= page);
    index > 0 && page < ranges[index - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_ranges_come_from_the_permissions_column() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234 /usr/bin/python3
55d0c0001000-55d0c0003000 r-xp 00001000 08:01 1234 /usr/bin/python3
55d0c0004000-55d0c0005000 rw-p 00003000 08:01 1234 /usr/bin/python3
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
garbage line
";
        let ranges = writable_ranges(maps);
        assert_eq!(
            ranges,
            vec![
                (0x55d0c0004000, 0x55d0c0005000),
                (0x7ffd00000000, 0x7ffd00021000)
            ]
        );
        assert!(is_writable(&ranges, 0x55d0c0004000));
        assert!(!is_writable(&ranges, 0x55d0c0005000));
        assert!(!is_writable(&ranges, 0x55d0c0001000));
        assert!(is_writable(&ranges, 0x7ffd00020000));
        assert!(!is_writable(&ranges, 0));
    }

    #[test]
    fn the_loader_and_the_vdso_are_skipped() {
        assert!(skipped(b"/lib64/ld-linux-x86-64.so.2"));
        assert!(skipped(b"linux-vdso.so.1"));
        assert!(skipped(b"/lib/ld-musl-x86_64.so.1"));
        assert!(!skipped(b"/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(!skipped(b""));
    }

    #[test]
    fn a_read_only_page_is_refused_and_a_writable_word_is_written() {
        let mut word = 0usize;
        assert_eq!(write_checked(&mut word as *mut usize as usize, 7), Ok(()));
        // SAFETY: reads a local the kernel wrote behind the compiler's back.
        assert_eq!(unsafe { std::ptr::read_volatile(&word) }, 7);
        // SAFETY: a fresh anonymous read-only page, unmapped below.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        assert_eq!(write_checked(page as usize, 7), Err(libc::EFAULT));
        // SAFETY: the page mapped above.
        unsafe { libc::munmap(page, 4096) };
    }

    #[test]
    fn the_walk_finds_the_slots_of_malloc_in_order() {
        // SAFETY: a lookup in the global scope, by a NUL-terminated name.
        let canonical = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as usize;
        let table = [Interposed {
            name: c"malloc",
            canonical,
            definition: 0,
            hook: 0,
            loader_calls_it: true,
        }];
        // SAFETY: one walk at a time (this test's).
        let slots = unsafe { walk(&table, 0) };
        // libc calls its own malloc through a slot (so that an interposed one is used), and this
        // test binary allocates.
        assert!(!slots.is_empty());
        assert!(slots
            .windows(2)
            .all(|pair| pair[0].address < pair[1].address));
        let patches = Patches {
            slots,
            ..Patches::default()
        };
        let mut found = table;
        patches.find_definitions(&mut found);
        assert_ne!(found[0].definition, 0);
        assert_eq!(patches.slot_values().len(), patches.slots.len());
    }

    #[test]
    fn counters_count_loaded_objects() {
        let (adds, subs) = loader_counters();
        assert!(adds >= 1 && subs <= adds, "{adds} {subs}");
    }
}
