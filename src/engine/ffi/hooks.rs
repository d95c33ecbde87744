//! What every allocator hook does around the allocator it wraps: record a new block in the
//! engine, forget a freed one, or queue the event when the caller does not hold the GIL.

use std::ffi::c_void;

use super::current_thread_id;
#[cfg(read_frames)]
use super::frames;
#[cfg(read_frames)]
use super::runtime::FAST;
use super::runtime::{gil_thread_state, Caller, Claim, Pending, RUNTIME};
use super::sites::current_site;
use crate::engine::tracker::{Membership, ScopeMask};

impl Caller<'_> {
    #[inline(always)]
    fn record_alloc(&mut self, address: *mut c_void, size: usize) {
        let Caller::GilHolder(claim) = self else {
            return RUNTIME.queue(Pending::Alloc {
                address: address as usize,
                size,
                thread: current_thread_id(),
            });
        };
        let tstate = gil_thread_state();
        let cached = RUNTIME.cached_membership(tstate);
        if let Some(bits) = cached {
            if bits as ScopeMask == 0 {
                return; // No open scope follows this thread.
            }
            #[cfg(read_frames)]
            // SAFETY: the claim says the GIL is held, `tstate` is its thread state, and the
            // cache says the fast path applies.
            if bits & FAST != 0 && unsafe { record_alloc_fast(claim, tstate, address, size, bits) }
            {
                return;
            }
        }
        record_alloc_slowly(claim, tstate, cached, address, size);
    }

    #[inline(always)]
    fn forget(&mut self, address: *mut c_void) {
        match self {
            Caller::GilHolder(claim) => {
                if let Some(engine) = claim.engine() {
                    engine.tracker.on_free(address as usize);
                }
            }
            Caller::WithoutGil => RUNTIME.queue(Pending::Free {
                address: address as usize,
            }),
        }
    }
}

/// [`Caller::record_alloc`] of the GIL holder when the cache says [`FAST`]: the common case of
/// one scope, a site in the site cache and a block that fits a shadow word. Returns false,
/// having recorded nothing, for [`record_alloc_slowly`] to do it all.
///
/// # Safety
/// `tstate` is the claim's thread state, and `bits` is its cached membership, with [`FAST`]
/// set.
#[cfg(read_frames)]
#[inline(always)]
unsafe fn record_alloc_fast(
    claim: &mut Claim,
    tstate: usize,
    address: *mut c_void,
    size: usize,
    bits: u64,
) -> bool {
    if RUNTIME.has_pending() {
        return false; // Other threads' events go first.
    }
    // SAFETY: the claim says the GIL is held; [`FAST`] says the layouts were validated.
    let Some((_, instruction)) = (unsafe { frames::walk(tstate as *const u8) }) else {
        return false;
    };
    let Some(engine) = claim.engine_as_is() else {
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

/// [`Caller::record_alloc`] of the GIL holder, every case.
#[inline(never)]
fn record_alloc_slowly(
    claim: &mut Claim,
    tstate: usize,
    cached: Option<u64>,
    address: *mut c_void,
    size: usize,
) {
    // SAFETY: the claim says the GIL is held (and keeps the public API's allocations out), and
    // `tstate` is its thread state.
    let site = unsafe { current_site(tstate) };
    let membership = match cached {
        Some(bits) => Membership::from_bits(bits),
        None => match claim.refresh_membership(tstate) {
            Some(membership) => membership,
            None => return,
        },
    };
    let Some(engine) = claim.engine() else {
        return;
    };
    let site = engine.sites.intern(site);
    engine
        .tracker
        .on_alloc_as(address as usize, size, site, membership);
}

/// `gil_domain`: the hook is the mem or object domain's, always called with the GIL.
#[inline(always)]
pub(super) fn traced_alloc(
    size: usize,
    gil_domain: bool,
    allocate: impl Fn() -> *mut c_void,
) -> *mut c_void {
    RUNTIME.enter(
        gil_domain,
        |mut caller| {
            let address = allocate();
            if !address.is_null() {
                caller.record_alloc(address, size);
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
    RUNTIME.enter(
        gil_domain,
        |mut caller| {
            // The old block is forgotten before the realloc frees it: another thread may
            // get its address at once.
            let old_block = match (&mut caller, old.is_null()) {
                (_, true) => None,
                (Caller::GilHolder(claim), false) => claim
                    .engine()
                    .and_then(|engine| engine.tracker.take_block(old as usize)),
                (Caller::WithoutGil, false) => {
                    // Queued as a free: should the realloc fail (out of memory), the
                    // block stays forgotten, its bytes off the scopes that counted it.
                    caller.forget(old);
                    None
                }
            };
            let address = reallocate();
            if !address.is_null() {
                caller.record_alloc(address, new_size);
            } else if let (Some(block), true, Caller::GilHolder(claim)) =
                (old_block, new_size > 0, &mut caller)
            {
                // The realloc failed and the old block is still there.
                if let Some(engine) = claim.engine() {
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
    if !gil_domain {
        // A thread state may be freed here (a thread ended): a new thread may get its address.
        RUNTIME.forget_thread_state(address as usize);
    }
    if address.is_null() {
        return release();
    }
    if gil_domain {
        // The GIL holder forgets the block, then frees it outside the busy flag: the free
        // is a tail call, and the hook keeps fewer registers. (pymalloc hands a large
        // block's free to the raw domain, whose hook then finds nothing left to forget.)
        RUNTIME.enter(gil_domain, |mut caller| caller.forget(address), || ());
        return release();
    }
    RUNTIME.enter(
        gil_domain,
        |mut caller| {
            caller.forget(address);
            release();
        },
        &release,
    )
}
