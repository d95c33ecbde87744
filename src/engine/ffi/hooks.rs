//! What every allocator hook does around the allocator it wraps: record a new block in the
//! engine, forget a freed one, or queue the event when the caller does not hold the GIL.

use std::ffi::c_void;
use std::sync::atomic::Ordering::*;

use super::current_thread_id;
use super::engine::{
    cached_membership, engine, enter, gil_thread_state, queue, refresh_membership, Caller, Pending,
    GIL_THREAD,
};
#[cfg(read_frames)]
use super::engine::{ENGINE, FAST, HAS_PENDING};
#[cfg(read_frames)]
use super::frames;
use super::sites::current_site;
use crate::engine::tracker::{Membership, ScopeMask};

#[inline(always)]
fn record_alloc(caller: Caller, address: *mut c_void, size: usize) {
    if caller == Caller::WithoutGil {
        return queue(Pending::Alloc {
            address: address as usize,
            size,
            thread: current_thread_id(),
        });
    }
    let tstate = gil_thread_state();
    let cached = cached_membership(tstate);
    if let Some(bits) = cached {
        if bits as ScopeMask == 0 {
            return; // No open scope follows this thread.
        }
        #[cfg(read_frames)]
        // SAFETY: the caller holds the GIL, `tstate` is its thread state, and the cache
        // says the fast path applies.
        if bits & FAST != 0 && unsafe { record_alloc_fast(tstate, address, size, bits) } {
            return;
        }
    }
    record_alloc_slowly(tstate, cached, address, size);
}

/// [`record_alloc`] of the GIL holder when the cache says [`FAST`]: the common case of one
/// scope, a site in the site cache and a block that fits a shadow word. Returns false,
/// having recorded nothing, for [`record_alloc_slowly`] to do it all.
///
/// # Safety
/// The caller holds the GIL with its busy flag set, `tstate` is its thread state, and
/// `bits` is its cached membership, with [`FAST`] set.
#[cfg(read_frames)]
#[inline(always)]
unsafe fn record_alloc_fast(tstate: usize, address: *mut c_void, size: usize, bits: u64) -> bool {
    if HAS_PENDING.load(Relaxed) {
        return false; // Other threads' events go first.
    }
    // SAFETY: as the caller promises; [`FAST`] says the layouts were validated.
    let Some((_, instruction)) = (unsafe { frames::walk(tstate as *const u8) }) else {
        return false;
    };
    // SAFETY: the caller holds the GIL, and its busy flag keeps nested hooks out. A cached
    // membership was computed by the engine, which, once made, stays.
    let Some(engine) = (unsafe { &mut *ENGINE.0.get() }).as_mut() else {
        return false;
    };
    let Ok(site) = engine.sites.cached(instruction) else {
        return false;
    };
    let membership = Membership::from_bits(bits);
    engine
        .tracker
        .on_alloc_single(address as usize, size, site, membership)
}

/// [`record_alloc`] of the GIL holder, every case.
#[inline(never)]
fn record_alloc_slowly(tstate: usize, cached: Option<u64>, address: *mut c_void, size: usize) {
    // SAFETY: the caller holds the GIL and `tstate` is its thread state.
    let site = unsafe { current_site(tstate) };
    // SAFETY: the caller holds the GIL, and its busy flag keeps nested hooks out.
    let Some(engine) = (unsafe { engine() }) else {
        return;
    };
    let membership = match cached {
        Some(bits) => Membership::from_bits(bits),
        None => refresh_membership(engine, tstate),
    };
    let site = engine.sites.intern(site);
    engine
        .tracker
        .on_alloc_as(address as usize, size, site, membership);
}

#[inline(always)]
fn forget(caller: Caller, address: *mut c_void) {
    if caller == Caller::WithoutGil {
        return queue(Pending::Free {
            address: address as usize,
        });
    }
    // SAFETY: the caller holds the GIL, and its busy flag keeps nested hooks out.
    if let Some(engine) = unsafe { engine() } {
        engine.tracker.on_free(address as usize);
    }
}

/// `gil_domain`: the hook is the mem or object domain's, always called with the GIL.
#[inline(always)]
pub(super) fn traced_alloc(
    size: usize,
    gil_domain: bool,
    allocate: impl Fn() -> *mut c_void,
) -> *mut c_void {
    enter(
        gil_domain,
        |caller| {
            let address = allocate();
            if !address.is_null() {
                record_alloc(caller, address, size);
            }
            address
        },
        &allocate,
    )
}

#[inline(always)]
pub(super) fn traced_realloc(
    old: *mut c_void,
    new_size: usize,
    gil_domain: bool,
    reallocate: impl Fn() -> *mut c_void,
) -> *mut c_void {
    enter(
        gil_domain,
        |caller| {
            // The old block is forgotten before the realloc frees it: another thread may
            // get its address at once.
            let old_block = match (old.is_null(), caller) {
                (true, _) => None,
                (false, Caller::GilHolder) => {
                    // SAFETY: the caller holds the GIL and its busy flag is set.
                    unsafe { engine() }
                        .as_mut()
                        .and_then(|engine| engine.tracker.take_block(old as usize))
                }
                (false, Caller::WithoutGil) => {
                    // Queued as a free: should the realloc fail (out of memory), the
                    // block stays forgotten, its bytes off the scopes that counted it.
                    forget(caller, old);
                    None
                }
            };
            let address = reallocate();
            if !address.is_null() {
                record_alloc(caller, address, new_size);
            } else if let (Some(block), true) = (old_block, new_size > 0) {
                // The realloc failed and the old block is still there.
                // SAFETY: as above (only the GIL holder takes a block).
                if let Some(engine) = unsafe { engine() } {
                    engine.tracker.restore(old as usize, block);
                }
            }
            address
        },
        &reallocate,
    )
}

#[inline(always)]
pub(super) fn traced_free(address: *mut c_void, gil_domain: bool, release: impl Fn()) {
    if !gil_domain && address as usize == GIL_THREAD.load(Relaxed) {
        // A thread state is freed here (a thread ended): a new thread may get its address.
        let _ = GIL_THREAD.compare_exchange(address as usize, 0, Relaxed, Relaxed);
    }
    if address.is_null() {
        return release();
    }
    if gil_domain {
        // The GIL holder forgets the block, then frees it outside the busy flag: the free
        // is a tail call, and the hook keeps fewer registers. (pymalloc hands a large
        // block's free to the raw domain, whose hook then finds nothing left to forget.)
        enter(gil_domain, |caller| forget(caller, address), || ());
        return release();
    }
    enter(
        gil_domain,
        |caller| {
            forget(caller, address);
            release();
        },
        &release,
    )
}
