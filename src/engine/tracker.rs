//! Exact accounting of traced memory: which blocks are alive, which open scopes each one counts
//! in, and every scope's live bytes, high water mark and per-site figures at that mark.
//!
//! Pure Rust, fed by the allocator hooks and tested here without Python. The model is the one
//! tracemalloc and memray use: a block counts in a scope when it was allocated inside the scope by
//! a thread the scope follows; a realloc is a free of the old block and an allocation of the new
//! one. Frees of blocks the tracker never saw change nothing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::engine::blocks::{self, Blocks};

/// How many scopes may be open at once (one bit each in a block's scope mask).
pub const MAX_SCOPES: usize = 32;

/// An allocation site: an index into the hooks' site table. 0 is "no Python frame".
pub type SiteId = u32;
pub const NATIVE_SITE: SiteId = 0;

/// The bit set of open scopes: bit `i` is scope slot `i`.
pub type ScopeMask = u32;

/// The open scopes that follow a thread, with the class its new blocks are filed under in the
/// shadow map: what the hooks cache for the thread that holds the GIL. Valid until a scope
/// opens or closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub mask: ScopeMask,
    class: u8,
}

impl Membership {
    /// As one word, for an atomic.
    pub fn to_bits(self) -> u64 {
        u64::from(self.mask) | u64::from(self.class) << 32
    }

    /// From [`Membership::to_bits`]; higher bits are ignored.
    pub fn from_bits(bits: u64) -> Self {
        Membership {
            mask: bits as ScopeMask,
            class: (bits >> 32) as u8,
        }
    }

    /// Whether [`Tracker::on_alloc_single`] takes blocks under this membership: one scope
    /// follows the thread, and the blocks' class fits a shadow word.
    pub fn is_single(self) -> bool {
        self.mask.count_ones() == 1 && blocks::is_word_class(u64::from(self.class))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub size: usize,
    /// How many scopes had been opened when the block was allocated; a scope counts the block
    /// only when it was opened no later (`scope.epoch <= block.epoch`).
    pub(crate) epoch: u32,
    pub(crate) site: SiteId,
    /// The scopes whose threads allocated it.
    pub(crate) mask: ScopeMask,
}

impl Block {
    pub const EMPTY: Block = Block {
        size: 0,
        epoch: 0,
        site: NATIVE_SITE,
        mask: 0,
    };
}

#[derive(Debug, Clone, Copy, Default)]
struct SiteCounter {
    live: u64,
    /// The live bytes at the scope's latest peak, valid when `version == scope.peak_version`.
    at_peak: u64,
    version: u64,
}

impl SiteCounter {
    /// Saves the value at the latest peak before the first change since that peak: a site not
    /// touched since the peak still holds, in `live`, what it held then. This makes recording
    /// the sites at the peak O(1) per allocation instead of a copy of all sites at every peak.
    fn touch(&mut self, peak_version: u64) -> &mut Self {
        if self.version < peak_version {
            self.at_peak = self.live;
            self.version = peak_version;
        }
        self
    }

    fn bytes_at_peak(&self, peak_version: u64) -> u64 {
        if self.version < peak_version {
            self.live
        } else {
            self.at_peak
        }
    }
}

#[derive(Debug, Default)]
struct ScopeState {
    /// The OS id of the thread that opened the scope, and the threads that were running then
    /// (sorted): those do not count, threads started later do.
    opener_thread: u64,
    threads_before: Vec<u64>,
    /// The scope's epoch (see [`Block::epoch`]).
    epoch: u32,
    /// Set: the threads it follows count in it and in scopes opened after it, not in the
    /// scopes that were open before (a stretch measured apart, such as a first import).
    apart: bool,
    live: u64,
    peak: u64,
    allocated: u64,
    allocations: u64,
    peak_version: u64,
    sites: Vec<SiteCounter>,
}

impl ScopeState {
    #[inline(always)]
    fn site(&mut self, site: SiteId) -> &mut SiteCounter {
        let index = site as usize;
        let peak_version = self.peak_version;
        // One bounds check: a site not seen yet takes the cold path.
        if index < self.sites.len() {
            return self.sites[index].touch(peak_version);
        }
        self.new_site(index).touch(peak_version)
    }

    #[cold]
    #[inline(never)]
    fn new_site(&mut self, index: usize) -> &mut SiteCounter {
        self.sites.resize(index + 1, SiteCounter::default());
        &mut self.sites[index]
    }

    #[inline]
    fn count_free(&mut self, bytes: u64, site: SiteId) {
        self.live = self.live.saturating_sub(bytes);
        let site = self.site(site);
        site.live = site.live.saturating_sub(bytes);
    }

    #[inline]
    fn count_alloc(&mut self, bytes: u64, site: SiteId) {
        self.allocations += 1;
        self.allocated += bytes;
        self.live += bytes;
        self.site(site).live += bytes;
        if self.live > self.peak {
            self.peak = self.live;
            self.peak_version += 1;
        }
    }

    fn follows(&self, thread: u64) -> bool {
        thread == self.opener_thread || self.threads_before.binary_search(&thread).is_err()
    }
}

/// What a scope measured, in traced bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeFigures {
    pub peak_bytes: u64,
    pub leaked_bytes: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    /// Bytes each site held at the peak, largest first; they add up to `peak_bytes`.
    pub sites_at_peak: Vec<(SiteId, u64)>,
    /// Bytes each site still held at the end, largest first; they add up to `leaked_bytes`.
    pub sites_leaked: Vec<(SiteId, u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrackerError {
    #[error("more than {MAX_SCOPES} measurement scopes are open at once")]
    TooManyScopes,
    #[error("measurement scope {0} is not open")]
    NotOpen(usize),
    #[error(
        "memgauge's engine needs the GIL, and this free-threaded Python runs without it \
         (PYTHON_GIL=0 or -X gil=0): run without that setting to measure"
    )]
    GilDisabled,
    #[error(
        "memgauge cannot tell which threads hold this Python's GIL: the thread state's layout \
         is not the one it knows (a CPython newer than memgauge?); upgrade memgauge to measure"
    )]
    ThreadStateLayout,
}

/// A fast hash for addresses and site keys: a folded 128-bit multiply, good in the high and the
/// low bits (the table indexes by the low ones). SipHash would double the hooks' cost.
#[derive(Default, Clone, Copy)]
pub struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, value: u64) {
        let product = u128::from(self.0 ^ value) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }

    fn write_i32(&mut self, value: i32) {
        self.write_u64(value as u32 as u64);
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FoldHasher>>;

#[derive(Default)]
pub struct Tracker {
    blocks: Blocks,
    /// Slot `i` holds a scope while bit `i` of [`Tracker::open_mask`] is set (the blocks keep
    /// the mask, which they need for every free); a closed slot is default.
    scopes: [ScopeState; MAX_SCOPES],
    epochs_opened: u32,
}

/// [`Tracker::each_scope`] for two scopes or more: out of the hooks' line, so that the one-scope
/// path keeps few registers.
#[cold]
#[inline(never)]
fn each_of_several(
    scopes: &mut [ScopeState; MAX_SCOPES],
    mask: ScopeMask,
    mut apply: impl FnMut(&mut ScopeState),
) {
    for slot in slots(mask) {
        apply(&mut scopes[slot]);
    }
}

/// The slots whose bits are set in `mask`, lowest first.
pub(crate) fn slots(mut mask: ScopeMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let slot = mask.trailing_zeros() as usize;
        mask &= mask.wrapping_sub(1);
        (slot < MAX_SCOPES).then_some(slot)
    })
}

impl Tracker {
    pub fn open_mask(&self) -> ScopeMask {
        self.blocks.open_mask()
    }

    pub fn is_idle(&self) -> bool {
        self.open_mask() == 0
    }

    /// Opens a scope followed by `opener_thread` and by threads not in `threads_before`.
    pub fn open_scope(
        &mut self,
        opener_thread: u64,
        threads_before: Vec<u64>,
    ) -> Result<usize, TrackerError> {
        self.open_scope_as(opener_thread, threads_before, false)
    }

    /// [`Tracker::open_scope`]; with `apart`, what the threads it follows allocate until it
    /// closes counts in it (and scopes opened later), not in the scopes already open, and
    /// their later frees of those blocks are not taken off those scopes either.
    pub fn open_scope_as(
        &mut self,
        opener_thread: u64,
        mut threads_before: Vec<u64>,
        apart: bool,
    ) -> Result<usize, TrackerError> {
        let slot = (!self.open_mask()).trailing_zeros() as usize;
        if slot >= MAX_SCOPES {
            return Err(TrackerError::TooManyScopes);
        }
        threads_before.sort_unstable();
        self.epochs_opened += 1;
        self.blocks.scope_opened(slot, self.epochs_opened);
        self.scopes[slot] = ScopeState {
            opener_thread,
            threads_before,
            epoch: self.epochs_opened,
            apart,
            ..ScopeState::default()
        };
        Ok(slot)
    }

    /// Closes a scope and returns its figures. When the last scope closes, every record goes.
    pub fn close_scope(&mut self, slot: usize) -> Result<ScopeFigures, TrackerError> {
        if !self.is_open(slot) {
            return Err(TrackerError::NotOpen(slot));
        }
        let scope = std::mem::take(&mut self.scopes[slot]);
        self.blocks.scope_closed(slot);
        if self.open_mask() == 0 {
            self.blocks.clear();
        }
        let ranked = |bytes: &dyn Fn(&SiteCounter) -> u64| {
            let mut sites: Vec<(SiteId, u64)> = scope
                .sites
                .iter()
                .enumerate()
                .map(|(site, counter)| (site as SiteId, bytes(counter)))
                .filter(|&(_, bytes)| bytes > 0)
                .collect();
            sites.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            sites
        };
        let sites_at_peak = ranked(&|counter| counter.bytes_at_peak(scope.peak_version));
        let sites_leaked = ranked(&|counter| counter.live);
        Ok(ScopeFigures {
            peak_bytes: scope.peak,
            leaked_bytes: scope.live,
            allocated_bytes: scope.allocated,
            allocations: scope.allocations,
            sites_at_peak,
            sites_leaked,
        })
    }

    /// A scope's live bytes and its high water mark since the last call (or since it opened);
    /// the mark restarts from the live bytes, so the next call sees only what came after.
    pub fn take_peak(&mut self, slot: usize) -> Option<(u64, u64)> {
        if !self.is_open(slot) {
            return None;
        }
        let scope = &mut self.scopes[slot];
        let figures = (scope.live, scope.peak);
        // The mark is now: every site's value at it is its live value.
        scope.peak = scope.live;
        scope.peak_version += 1;
        Some(figures)
    }

    /// Which open scopes follow the thread `thread`: all that do, or, when one of them is
    /// measured apart, the newest such one and those opened after it.
    pub fn membership(&self, thread: u64) -> ScopeMask {
        let following = slots(self.open_mask())
            .filter(|&slot| self.scopes[slot].follows(thread))
            .fold(0, |mask: ScopeMask, slot| mask | (1 << slot));
        let newest_apart = slots(following)
            .filter(|&slot| self.scopes[slot].apart)
            .map(|slot| self.scopes[slot].epoch)
            .max();
        match newest_apart {
            None => following,
            Some(epoch) => slots(following)
                .filter(|&slot| self.scopes[slot].epoch >= epoch)
                .fold(0, |mask, slot| mask | (1 << slot)),
        }
    }

    /// `mask` (open scopes, say from [`Tracker::membership`]) with the class of the blocks
    /// allocated under it.
    pub fn classify(&mut self, mask: ScopeMask) -> Membership {
        let mask = mask & self.open_mask();
        let class = if mask == 0 {
            0
        } else {
            self.blocks.class_of(mask, self.epochs_opened) as u8
        };
        Membership { mask, class }
    }

    /// Records a new block allocated by a thread that the scopes in `mask` follow.
    pub fn on_alloc(&mut self, address: usize, size: usize, site: SiteId, mask: ScopeMask) {
        let membership = self.classify(mask);
        self.on_alloc_as(address, size, site, membership);
    }

    /// [`Tracker::on_alloc`] with the mask classified already: the hooks' path.
    #[inline(always)]
    pub fn on_alloc_as(&mut self, address: usize, size: usize, site: SiteId, member: Membership) {
        let mask = member.mask;
        if mask == 0 {
            return;
        }
        debug_assert_eq!(
            member,
            self.classify(mask),
            "a membership from before a scope opened or closed"
        );
        let class = u64::from(member.class);
        if !self.blocks.insert_new(address, size, site, class) {
            let block = Block {
                size,
                epoch: self.epochs_opened,
                site,
                mask,
            };
            self.insert_block(address, block);
        }
        self.each_scope(mask, |scope| scope.count_alloc(size as u64, site));
    }

    /// [`Tracker::on_alloc_as`] for a membership that [`Membership::is_single`], when the block
    /// fits a shadow word: the hooks' fast path. Returns false, having recorded nothing, when
    /// the block needs [`Tracker::on_alloc_as`].
    #[inline(always)]
    pub fn on_alloc_single(
        &mut self,
        address: usize,
        size: usize,
        site: SiteId,
        member: Membership,
    ) -> bool {
        debug_assert!(member.is_single());
        debug_assert_eq!(member, self.classify(member.mask));
        if !self
            .blocks
            .insert_in_leaf(address, size, site, u64::from(member.class))
        {
            return false;
        }
        let slot = member.mask.trailing_zeros() as usize % MAX_SCOPES;
        self.scopes[slot].count_alloc(size as u64, site);
        true
    }

    /// Forgets a freed block.
    #[inline(always)]
    pub fn on_free(&mut self, address: usize) {
        let (bytes, site, counting) = self.blocks.remove_counted(address);
        self.discharge_in(counting, bytes, site);
    }

    /// Forgets a block that a realloc is about to free; returns it when the tracker knew it,
    /// for [`Tracker::restore`] should the realloc fail.
    pub fn take_block(&mut self, address: usize) -> Option<Block> {
        let block = self.blocks.remove(address)?;
        self.discharge(&block);
        Some(block)
    }

    /// Puts back a block taken by [`Tracker::take_block`] whose realloc failed.
    pub fn restore(&mut self, address: usize, block: Block) {
        self.insert_block(address, block);
        let bytes = block.size as u64;
        self.each_scope(self.blocks.counting(&block), |scope| {
            scope.live += bytes;
            scope.site(block.site).live += bytes;
        });
    }

    fn insert_block(&mut self, address: usize, block: Block) {
        if let Some(stale) = self.blocks.insert(address, block) {
            // The address was freed where no hook saw it (a hook was bypassed): forget it.
            self.discharge(&stale);
        }
    }

    fn discharge(&mut self, block: &Block) {
        let counting = self.blocks.counting(block);
        self.discharge_in(counting, block.size as u64, block.site);
    }

    /// Takes a freed block's bytes off the scopes in `counting`.
    #[inline(always)]
    fn discharge_in(&mut self, counting: ScopeMask, bytes: u64, site: SiteId) {
        self.each_scope(counting, |scope| scope.count_free(bytes, site));
    }

    /// Applies `apply` to each scope in `mask`, a set of open scopes.
    #[inline(always)]
    fn each_scope(&mut self, mask: ScopeMask, mut apply: impl FnMut(&mut ScopeState)) {
        debug_assert_eq!(mask & !self.open_mask(), 0, "a closed scope counts a block");
        if mask & mask.wrapping_sub(1) == 0 {
            // At most one scope (the common case): no loop.
            if mask != 0 {
                apply(&mut self.scopes[mask.trailing_zeros() as usize % MAX_SCOPES]);
            }
            return;
        }
        each_of_several(&mut self.scopes, mask, apply);
    }

    fn is_open(&self, slot: usize) -> bool {
        slot < MAX_SCOPES && self.open_mask() & (1 << slot) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 1;

    fn open(tracker: &mut Tracker) -> usize {
        tracker.open_scope(ME, vec![ME, 2]).unwrap()
    }

    fn all(tracker: &Tracker) -> ScopeMask {
        tracker.membership(ME)
    }

    #[test]
    fn peak_leak_and_sites_at_the_peak() {
        let mut tracker = Tracker::default();
        let slot = open(&mut tracker);
        let mask = all(&tracker);
        tracker.on_alloc(0x1000, 8_000_056, 1, mask);
        tracker.on_alloc(0x2000, 72_000_056, 2, mask);
        tracker.on_free(0x2000);
        tracker.on_alloc(0x3000, 100, 3, mask);
        let figures = tracker.close_scope(slot).unwrap();
        assert_eq!(figures.peak_bytes, 80_000_112);
        assert_eq!(figures.leaked_bytes, 8_000_156);
        assert_eq!(figures.allocated_bytes, 80_000_212);
        assert_eq!(figures.allocations, 3);
        assert_eq!(figures.sites_at_peak, vec![(2, 72_000_056), (1, 8_000_056)]);
        assert_eq!(figures.sites_leaked, vec![(1, 8_000_056), (3, 100)]);
        assert!(tracker.is_idle());
    }

    #[test]
    fn the_single_scope_path_records_what_the_general_one_does() {
        let blocks = [(0x10_0000, 64, 1), (0x10_0040, 4096, 2), (0x10_2000, 24, 1)];
        let figures = |single: bool| {
            let mut tracker = Tracker::default();
            let slot = open(&mut tracker);
            let member = tracker.classify(all(&tracker));
            assert!(member.is_single());
            // The first block makes the leaf; after it, the single path takes every block.
            tracker.on_alloc_as(0x10_1000, 8, 3, member);
            for (address, size, site) in blocks {
                if single {
                    assert!(tracker.on_alloc_single(address, size, site, member));
                } else {
                    tracker.on_alloc_as(address, size, site, member);
                }
            }
            tracker.on_free(0x10_0040);
            tracker.close_scope(slot).unwrap()
        };
        assert_eq!(figures(true), figures(false));
        assert_eq!(figures(true).peak_bytes, 8 + 64 + 4096 + 24);
    }

    #[test]
    fn the_single_scope_path_declines_what_it_cannot_take() {
        let mut tracker = Tracker::default();
        let slot = open(&mut tracker);
        let member = tracker.classify(all(&tracker));
        // No leaf yet for this MiB, an address off the 16-byte grid, a word already taken.
        assert!(!tracker.on_alloc_single(0x20_0000, 64, 1, member));
        tracker.on_alloc_as(0x20_0000, 64, 1, member);
        assert!(!tracker.on_alloc_single(0x20_0008, 64, 1, member));
        assert!(!tracker.on_alloc_single(0x20_0000, 32, 1, member));
        let figures = tracker.close_scope(slot).unwrap();
        assert_eq!((figures.allocations, figures.peak_bytes), (1, 64));
    }

    #[test]
    fn take_peak_restarts_the_mark_from_the_live_bytes() {
        let mut tracker = Tracker::default();
        let slot = open(&mut tracker);
        let mask = all(&tracker);
        tracker.on_alloc(0x1000, 500, 1, mask);
        tracker.on_free(0x1000);
        tracker.on_alloc(0x2000, 100, 1, mask);
        assert_eq!(tracker.take_peak(slot), Some((100, 500)));
        tracker.on_alloc(0x3000, 50, 1, mask);
        tracker.on_free(0x3000);
        assert_eq!(tracker.take_peak(slot), Some((100, 150)));
        assert_eq!(tracker.take_peak(slot), Some((100, 100)));
        assert_eq!(tracker.take_peak(slot + 1), None);
        // The scope's own peak is a mark like any other: the sites still add up to it.
        let figures = tracker.close_scope(slot).unwrap();
        assert_eq!(figures.peak_bytes, 100);
        assert_eq!(figures.sites_at_peak.iter().map(|s| s.1).sum::<u64>(), 100);
    }

    #[test]
    fn one_at_a_time_peaks_at_one() {
        let mut tracker = Tracker::default();
        let slot = open(&mut tracker);
        let mask = all(&tracker);
        for _ in 0..10 {
            tracker.on_alloc(0x1000, 10_000_000, 1, mask);
            tracker.on_free(0x1000);
        }
        let figures = tracker.close_scope(slot).unwrap();
        assert_eq!(figures.peak_bytes, 10_000_000);
        assert_eq!(figures.leaked_bytes, 0);
        assert_eq!(figures.sites_at_peak, vec![(1, 10_000_000)]);
    }

    #[test]
    fn unknown_frees_change_nothing() {
        let mut tracker = Tracker::default();
        let slot = open(&mut tracker);
        assert_eq!(tracker.take_block(0xdead), None);
        tracker.on_free(0xdead);
        tracker.on_alloc(0x1000, 64, 1, all(&tracker));
        assert_eq!(tracker.take_block(0xbeef), None);
        tracker.on_free(0xbeef);
        let figures = tracker.close_scope(slot).unwrap();
        assert_eq!((figures.peak_bytes, figures.leaked_bytes), (64, 64));
    }

    #[test]
    fn nested_scopes_measure_their_own_stretch() {
        let mut tracker = Tracker::default();
        let outer = open(&mut tracker);
        tracker.on_alloc(0x1000, 1000, 1, all(&tracker));
        let inner = open(&mut tracker);
        // A free inside the inner scope of a block from before it does not lower the inner one.
        tracker.on_free(0x1000);
        tracker.on_alloc(0x2000, 300, 2, all(&tracker));
        let inner_figures = tracker.close_scope(inner).unwrap();
        assert_eq!(inner_figures.peak_bytes, 300);
        assert_eq!(inner_figures.leaked_bytes, 300);
        tracker.on_alloc(0x3000, 50, 3, all(&tracker));
        let outer_figures = tracker.close_scope(outer).unwrap();
        assert_eq!(outer_figures.peak_bytes, 1000);
        assert_eq!(outer_figures.leaked_bytes, 350);
        assert_eq!(outer_figures.allocations, 3);
    }

    #[test]
    fn reused_slot_does_not_count_older_blocks() {
        let mut tracker = Tracker::default();
        let outer = open(&mut tracker);
        let first = open(&mut tracker);
        tracker.on_alloc(0x1000, 500, 1, all(&tracker));
        tracker.close_scope(first).unwrap();
        let second = open(&mut tracker);
        assert_eq!(first, second);
        tracker.on_free(0x1000);
        let figures = tracker.close_scope(second).unwrap();
        assert_eq!((figures.peak_bytes, figures.leaked_bytes), (0, 0));
        assert_eq!(tracker.close_scope(outer).unwrap().leaked_bytes, 0);
    }

    #[test]
    fn blocks_too_big_for_a_word_count_in_the_scopes_that_saw_them() {
        let mut tracker = Tracker::default();
        let outer = open(&mut tracker);
        let huge = 1 << 40;
        tracker.on_alloc(0x1000, huge, 1, all(&tracker));
        let inner = open(&mut tracker);
        tracker.on_alloc(0x2000, huge, 2, all(&tracker));
        tracker.on_free(0x1000);
        let inner_figures = tracker.close_scope(inner).unwrap();
        assert_eq!(
            (inner_figures.peak_bytes, inner_figures.leaked_bytes),
            (huge as u64, huge as u64)
        );
        // After the inner scope closed, its block still counts in the outer one only.
        tracker.on_free(0x2000);
        let outer_figures = tracker.close_scope(outer).unwrap();
        assert_eq!(
            (outer_figures.peak_bytes, outer_figures.leaked_bytes),
            (2 * huge as u64, 0)
        );
    }

    #[test]
    fn a_scope_apart_keeps_its_blocks_out_of_the_scopes_open_before() {
        let mut tracker = Tracker::default();
        let outer = open(&mut tracker);
        tracker.on_alloc(0x1000, 100, 1, all(&tracker));
        // A thread the outer scope follows and the apart one does not (it ran before).
        let helper = 7;
        let apart = tracker
            .open_scope_as(ME, vec![ME, 2, helper], true)
            .unwrap();
        assert_eq!(all(&tracker), 1 << apart);
        assert_eq!(tracker.membership(helper), 1 << outer);
        tracker.on_alloc(0x2000, 5000, 2, all(&tracker));
        tracker.on_alloc(0x3000, 700, 2, all(&tracker));
        tracker.on_free(0x3000);
        tracker.on_alloc(0x4000, 30, 3, tracker.membership(helper));
        // A scope opened inside the apart one counts with it.
        let inner = open(&mut tracker);
        assert_eq!(all(&tracker), 1 << apart | 1 << inner);
        tracker.on_alloc(0x5000, 9, 4, all(&tracker));
        assert_eq!(tracker.close_scope(inner).unwrap().peak_bytes, 9);
        let apart_figures = tracker.close_scope(apart).unwrap();
        assert_eq!(
            (apart_figures.peak_bytes, apart_figures.leaked_bytes),
            (5700, 5009)
        );
        // Back in the outer scope alone: the apart blocks' frees change nothing in it.
        assert_eq!(all(&tracker), 1 << outer);
        tracker.on_free(0x2000);
        tracker.on_alloc(0x6000, 40, 5, all(&tracker));
        let outer_figures = tracker.close_scope(outer).unwrap();
        assert_eq!(
            (outer_figures.peak_bytes, outer_figures.leaked_bytes),
            (170, 170)
        );
        assert_eq!(outer_figures.allocations, 3);
    }

    #[test]
    fn threads_running_before_the_scope_do_not_count() {
        let mut tracker = Tracker::default();
        let slot = tracker.open_scope(ME, vec![ME, 2]).unwrap();
        assert_eq!(tracker.membership(2), 0);
        assert_eq!(tracker.membership(3), 1 << slot);
        tracker.on_alloc(0x1000, 10, 1, tracker.membership(2));
        tracker.on_alloc(0x2000, 20, 1, tracker.membership(3));
        assert_eq!(tracker.close_scope(slot).unwrap().peak_bytes, 20);
    }

    #[test]
    fn failed_realloc_restores_the_block() {
        let mut tracker = Tracker::default();
        let slot = open(&mut tracker);
        tracker.on_alloc(0x1000, 40, 1, all(&tracker));
        let block = tracker.take_block(0x1000).unwrap();
        tracker.restore(0x1000, block);
        tracker.on_free(0x1000);
        let figures = tracker.close_scope(slot).unwrap();
        assert_eq!(
            (
                figures.peak_bytes,
                figures.leaked_bytes,
                figures.allocations
            ),
            (40, 0, 1)
        );
    }

    #[test]
    fn too_many_scopes_is_an_error() {
        let mut tracker = Tracker::default();
        for _ in 0..MAX_SCOPES {
            open(&mut tracker);
        }
        assert_eq!(
            tracker.open_scope(ME, vec![]),
            Err(TrackerError::TooManyScopes)
        );
        assert_eq!(tracker.close_scope(99), Err(TrackerError::NotOpen(99)));
    }

    proptest::proptest! {
        /// Scopes opened and closed in any order (slots reused) each see exactly the blocks
        /// allocated while they were open: peak and leak match a model of every scope.
        #[test]
        fn overlapping_scopes_match_a_model(ops in proptest::collection::vec((0u8..4, 0usize..24, 1u64..5000), 1..300)) {
            #[derive(Default)]
            struct Model { blocks: std::collections::HashMap<usize, u64>, live: u64, peak: u64 }
            let mut tracker = Tracker::default();
            let mut scopes: Vec<(usize, Model)> = Vec::new();
            let mut everywhere = std::collections::HashMap::new();
            for (op, unit, size) in ops {
                let address = 0x10_0000 + unit * 16 + (unit % 3) * (1 << 20);
                match op {
                    0 if scopes.len() < 4 => scopes.push((open(&mut tracker), Model::default())),
                    1 if !scopes.is_empty() => {
                        let (slot, model) = scopes.remove(unit % scopes.len());
                        let figures = tracker.close_scope(slot).unwrap();
                        proptest::prop_assert_eq!((figures.peak_bytes, figures.leaked_bytes), (model.peak, model.live));
                    }
                    2 => {
                        if everywhere.insert(address, size).is_some() {
                            continue; // a live address is not handed out twice
                        }
                        tracker.on_alloc(address, size as usize, 1, all(&tracker));
                        for (_, model) in &mut scopes {
                            model.blocks.insert(address, size);
                            model.live += size;
                            model.peak = model.peak.max(model.live);
                        }
                    }
                    _ => {
                        everywhere.remove(&address);
                        tracker.on_free(address);
                        for (_, model) in &mut scopes {
                            if let Some(size) = model.blocks.remove(&address) {
                                model.live -= size;
                            }
                        }
                    }
                }
            }
        }

        /// Whatever the order of allocations and frees, the sites at the peak add up to the peak,
        /// and the peak and the leak match a direct replay.
        #[test]
        fn sites_at_peak_add_up(ops in proptest::collection::vec((1usize..17, 1usize..5000, 0u32..6, proptest::bool::ANY), 1..200)) {
            let mut tracker = Tracker::default();
            let slot = open(&mut tracker);
            let mask = all(&tracker);
            let mut live = std::collections::HashMap::new();
            let (mut current, mut peak) = (0u64, 0u64);
            for (address, size, site, free) in ops {
                if free {
                    if let Some(size) = live.remove(&address) { current -= size as u64; }
                    tracker.on_free(address);
                } else {
                    if let Some(old) = live.insert(address, size) { current -= old as u64; }
                    current += size as u64;
                    peak = peak.max(current);
                    tracker.on_alloc(address, size, site, mask);
                }
            }
            let figures = tracker.close_scope(slot).unwrap();
            proptest::prop_assert_eq!(figures.peak_bytes, peak);
            proptest::prop_assert_eq!(figures.leaked_bytes, current);
            let sum: u64 = figures.sites_at_peak.iter().map(|s| s.1).sum();
            proptest::prop_assert_eq!(sum, peak);
        }
    }
}
