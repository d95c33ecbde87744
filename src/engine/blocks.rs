//! The table of live blocks: address → what the tracker knows about the block.
//!
//! Every traced allocation inserts here and every free looks up, so this is the engine's hot
//! spot. Two structures:
//! - a **shadow map**: one 8-byte word per 16 bytes of address space, in 512 KiB leaves made
//!   when a block first lands in their MiB. The word packs the block's size, site and scope
//!   class. Allocators hand out neighbouring addresses to neighbouring requests, so the words a
//!   program touches are neighbours too and stay in cache: on a recorded trace of
//!   `bench/engine.py` an insert or remove costs ~3 ns, against 10-15 ns for the hash tables
//!   tried (`std`'s `HashMap`; open addressing with prefetch), whose lookups scatter by design;
//! - a hash table, [`BlockTable`], for what does not fit a word: addresses not 16-aligned or
//!   beyond 48 bits, sizes of 64 GiB and more, site ids past 2^20, more than 254 scope classes
//!   in use at once (a class no word holds any more is given back when they run out).
//!
//! The leaves cost, in resident memory, at most half the span of small blocks they cover
//! (8 bytes per 16); a hash entry per small block costs about as much. When the last scope
//! closes, the blocks are forgotten and a few leaves stay, cleaned, for the next scope.

use crate::engine::tracker::{slots, Block, ScopeMask, SiteId, MAX_SCOPES, NATIVE_SITE};

#[derive(Clone, Copy)]
struct Slot {
    /// 0 marks an empty slot: no allocator returns address 0 for a live block.
    address: usize,
    block: Block,
}

const EMPTY: Slot = Slot {
    address: 0,
    block: Block::EMPTY,
};

/// Fibonacci hashing: the high bits of a multiply spread neighbouring addresses over the table.
const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
const MIN_BITS: u32 = 10;

/// An open-addressing hash table with linear probing and backward-shift deletion (no
/// tombstones, so churn never degrades it).
pub struct BlockTable {
    slots: Box<[Slot]>,
    len: usize,
    bits: u32,
}

impl Default for BlockTable {
    fn default() -> Self {
        Self::with_bits(MIN_BITS)
    }
}

impl BlockTable {
    fn with_bits(bits: u32) -> Self {
        Self {
            slots: vec![EMPTY; 1 << bits].into_boxed_slice(),
            len: 0,
            bits,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empty and at its smallest again; a table that already is stays as it is (no new
    /// allocation when a scope closes).
    pub fn reset(&mut self) {
        if self.len > 0 || self.bits > MIN_BITS {
            *self = Self::default();
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, address: usize) -> usize {
        // Blocks are at least 8-aligned; the low bits carry no information.
        ((address as u64 >> 3).wrapping_mul(MULTIPLIER) >> (64 - self.bits)) as usize
    }

    /// Inserts or replaces; returns the block that was there.
    pub fn insert(&mut self, address: usize, block: Block) -> Option<Block> {
        debug_assert_ne!(address, 0);
        // Grow at 70% full: linear probing stays short below that.
        if (self.len + 1) * 10 > self.slots.len() * 7 {
            self.grow();
        }
        let mask = self.mask();
        let mut index = self.home(address);
        loop {
            let slot = &mut self.slots[index];
            if slot.address == 0 {
                *slot = Slot { address, block };
                self.len += 1;
                return None;
            }
            if slot.address == address {
                return Some(std::mem::replace(&mut slot.block, block));
            }
            index = (index + 1) & mask;
        }
    }

    pub fn remove(&mut self, address: usize) -> Option<Block> {
        if address == 0 {
            return None;
        }
        let mask = self.mask();
        let mut index = self.home(address);
        loop {
            let slot = &self.slots[index];
            if slot.address == address {
                break;
            }
            if slot.address == 0 {
                return None;
            }
            index = (index + 1) & mask;
        }
        let found = self.slots[index].block;
        self.len -= 1;
        // Backward-shift deletion: pull later members of the run into the hole when their home
        // is not after the hole, so every lookup's run stays unbroken.
        let mut hole = index;
        let mut next = (index + 1) & mask;
        loop {
            let slot = self.slots[next];
            if slot.address == 0 {
                break;
            }
            let from_home = next.wrapping_sub(self.home(slot.address)) & mask;
            let from_hole = next.wrapping_sub(hole) & mask;
            if from_home >= from_hole {
                self.slots[hole] = slot;
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.slots[hole] = EMPTY;
        Some(found)
    }

    fn grow(&mut self) {
        let old = std::mem::replace(self, Self::with_bits(self.bits + 1));
        for slot in old.slots.iter().filter(|slot| slot.address != 0) {
            self.insert(slot.address, slot.block);
        }
    }
}

const GRANULE_BITS: u32 = 4;
/// Words per leaf: a leaf covers 1 MiB.
const LEAF_BITS: u32 = 16;
/// Leaves per region: a region covers 4 GiB; a process uses a few.
const REGION_BITS: u32 = 12;
/// Regions in the top table: the 48-bit address space.
const TOP_BITS: u32 = 48 - GRANULE_BITS - LEAF_BITS - REGION_BITS;

const SIZE_BITS: u32 = 36;
const SITE_BITS: u32 = 20;
const CLASS_SHIFT: u32 = SIZE_BITS + SITE_BITS;
/// A word's class: 0 is an empty word, [`IN_TABLE`] sends the lookup to the hash table.
const IN_TABLE: u64 = 0xFF;
const MAX_CLASSES: usize = IN_TABLE as usize - 1;
/// A class slot given back by [`Blocks::reclaim_classes`], free for another (mask, epoch): no
/// block has the epoch `u32::MAX`.
const FREE_CLASS: (ScopeMask, u32) = (0, u32::MAX);
/// A scan of the shadow map that gives back fewer class slots than this is not tried again for
/// [`RECLAIM_WAIT`] new classes (which go to the table meanwhile).
const RECLAIM_ENOUGH: usize = 32;
const RECLAIM_WAIT: u32 = 64;

/// Whether blocks of `class` ([`Blocks::class_of`]) go in shadow words.
#[inline(always)]
pub fn is_word_class(class: u64) -> bool {
    class != 0 && class != IN_TABLE
}

/// Words per dirty bit of a leaf: 8 KiB of words, two pages (64 bits cover a leaf).
const CHUNK_BITS: u32 = 10;
/// Leaves kept, cleaned, when the last scope closes, for the next scope to reuse wherever it
/// needs a leaf: it starts without page faults or 512 KiB `calloc`s, which cost more than a small
/// test's whole measurement. (A pytest call phase touches about 20; a kept leaf holds only the
/// pages that were written, zeroed.)
const KEEP_LEAVES: usize = 64;
/// Regions kept (empty) when the last scope closes: each is a 64 KiB table of leaves.
const KEEP_REGIONS: usize = 8;

struct Leaf {
    /// A fixed-size array, so that indexing by a masked word number needs no bounds check.
    words: Box<[u64; 1 << LEAF_BITS]>,
    /// Which chunks of `words` may hold a non-zero word.
    dirty: u64,
}

impl Leaf {
    /// Puts `value` in word `word` when the word is empty; false, changing nothing, when not.
    #[inline(always)]
    fn claim(&mut self, word: usize, value: u64) -> bool {
        let slot = &mut self.words[word];
        if *slot != 0 {
            return false;
        }
        *slot = value;
        self.dirty |= 1 << (word >> CHUNK_BITS);
        true
    }

    fn new() -> Self {
        Leaf {
            words: vec![0u64; 1 << LEAF_BITS]
                .into_boxed_slice()
                .try_into()
                .expect("a leaf's length"),
            dirty: 0,
        }
    }

    fn clean(&mut self) {
        let mut dirty = self.dirty;
        while dirty != 0 {
            let chunk = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            self.words[chunk << CHUNK_BITS..(chunk + 1) << CHUNK_BITS].fill(0);
        }
        self.dirty = 0;
    }
}

/// A region's leaves, by index.
type Region = [Option<Leaf>; 1 << REGION_BITS];

/// Where the blocks are: the shadow map, and the table for what does not fit it.
pub struct Blocks {
    /// Every region, by key (the address's bits 32 to 47): one load finds an address's region,
    /// wherever it is. 512 KiB of address space, allocated zeroed, so only the pages of the
    /// regions a process uses are ever touched. (A search of the few regions in use, the last
    /// one found first, went to its slow path often when NumPy's buffers and the Python heap
    /// lie in different regions.)
    top: Box<[Option<Box<Region>>; 1 << TOP_BITS]>,
    /// The keys of the regions made, what `clear` and `len` visit.
    region_keys: Vec<usize>,
    table: BlockTable,
    /// The (scope mask, epoch) pairs blocks carry, interned: word class `i + 1` is `classes[i]`.
    classes: Vec<(ScopeMask, u32)>,
    /// `counting[c]`: the open scopes that count a block of word class `c` (none for an empty
    /// word). Kept as scopes close, so a free finds them with one load instead of checking
    /// each scope's epoch; one entry per value of a class byte, so the load needs no bounds
    /// check.
    counting: [ScopeMask; 256],
    /// The class interned last, as (mask, epoch, class): nearly every allocation's.
    last_class: (ScopeMask, u32, u64),
    /// Class slots no block uses any more, for new classes once all 254 were made: every scope
    /// that opens while another is open makes a class (a test's first imports measured apart,
    /// each round of a benchmark), and without them its blocks would go to the slower table.
    free_classes: Vec<u8>,
    /// New classes to make before the shadow map is scanned for free slots again.
    reclaim_wait: u32,
    /// The open scopes and the epoch each was opened at.
    open: ScopeMask,
    epochs: [u32; MAX_SCOPES],
    /// Clean leaves, for whichever region needs one next.
    spare: Vec<Leaf>,
    /// The leaves in use, as (region key, leaf index): what `clear` visits.
    in_use: Vec<(usize, usize)>,
}

/// Where an address's word is: region key, leaf and word index; `None` when it has none.
#[inline(always)]
fn word_index(address: usize) -> Option<(usize, usize, usize)> {
    let address = address as u64;
    if address & ((1 << GRANULE_BITS) - 1) != 0 || address >> 48 != 0 {
        return None;
    }
    let granule = address >> GRANULE_BITS;
    let word = (granule & ((1 << LEAF_BITS) - 1)) as usize;
    let leaf = ((granule >> LEAF_BITS) & ((1 << REGION_BITS) - 1)) as usize;
    let key = (granule >> (LEAF_BITS + REGION_BITS)) & ((1 << TOP_BITS) - 1);
    Some((key as usize, leaf, word))
}

/// Whether a block's size and site fit a shadow word.
#[inline(always)]
fn fits(size: usize, site: SiteId) -> bool {
    (size as u64) >> SIZE_BITS == 0 && site >> SITE_BITS == 0
}

/// The shadow word of a block that [`fits`], of `class`.
#[inline(always)]
fn word(size: usize, site: SiteId, class: u64) -> u64 {
    size as u64 | u64::from(site) << SIZE_BITS | class << CLASS_SHIFT
}

/// A region with no leaves, made on the heap (never on the stack: a hook may run on a thread
/// with a small one).
fn empty_region() -> Box<Region> {
    (0..1 << REGION_BITS)
        .map(|_| None)
        .collect::<Box<[_]>>()
        .try_into()
        .unwrap_or_else(|_| unreachable!("a region's length"))
}

/// The top table with no regions, as zeroed memory straight from the allocator: the kernel
/// maps its pages only when they are written, so the 512 KiB cost a page per region used.
fn empty_top() -> Box<[Option<Box<Region>>; 1 << TOP_BITS]> {
    crate::engine::ffi::zeroed_nones()
}

/// Makes region `key`, in the empty place `empty`.
#[cold]
#[inline(never)]
fn new_region<'a>(
    empty: &'a mut Option<Box<Region>>,
    region_keys: &mut Vec<usize>,
    key: usize,
) -> &'a mut Region {
    region_keys.push(key);
    empty.insert(empty_region())
}

/// Puts a leaf (a spare one if any) in the empty place `empty`, leaf `index` of region `key`.
#[cold]
#[inline(never)]
fn new_leaf<'a>(
    empty: &'a mut Option<Leaf>,
    in_use: &mut Vec<(usize, usize)>,
    spare: &mut Vec<Leaf>,
    key: usize,
    index: usize,
) -> &'a mut Leaf {
    in_use.push((key, index));
    empty.insert(spare.pop().unwrap_or_else(Leaf::new))
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks {
            top: empty_top(),
            region_keys: Vec::new(),
            table: BlockTable::default(),
            classes: Vec::new(),
            counting: [0; 256],
            last_class: (0, 0, 0),
            free_classes: Vec::new(),
            reclaim_wait: 0,
            open: 0,
            epochs: [0; MAX_SCOPES],
            spare: Vec::new(),
            in_use: Vec::new(),
        }
    }
}

impl Blocks {
    /// How many blocks there are, counted word by word (the hooks keep no count): for tests.
    pub fn len(&self) -> usize {
        // A word of class IN_TABLE stands for a block the table counts.
        let in_words = |leaf: &Leaf| {
            let class = |word: &&u64| *word >> CLASS_SHIFT;
            let dirty = leaf.words.chunks(1 << CHUNK_BITS).enumerate();
            dirty
                .filter(|(chunk, _)| leaf.dirty & 1 << chunk != 0)
                .flat_map(|(_, words)| words)
                .filter(|word| class(word) != 0 && class(word) != IN_TABLE)
                .count()
        };
        let regions = self
            .region_keys
            .iter()
            .filter_map(|&key| self.top[key].as_ref());
        let leaves = regions.flat_map(|region| region.iter().flatten());
        leaves.map(in_words).sum::<usize>() + self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every block. Up to [`KEEP_LEAVES`] leaves stay, cleaned, for the next scope.
    pub fn clear(&mut self) {
        for (key, index) in self.in_use.drain(..) {
            let region = self.top[key].as_mut();
            if let Some(mut leaf) = region.and_then(|region| region[index].take()) {
                if self.spare.len() < KEEP_LEAVES {
                    leaf.clean();
                    self.spare.push(leaf);
                }
            }
        }
        // The regions kept are empty: every leaf in use was taken above.
        for key in self
            .region_keys
            .drain(KEEP_REGIONS.min(self.region_keys.len())..)
        {
            self.top[key] = None;
        }
        self.table.reset();
        self.counting[..=self.classes.len()].fill(0);
        self.classes.clear();
        self.last_class = (0, 0, 0);
        self.free_classes.clear();
        self.reclaim_wait = 0;
    }

    /// The open scopes, as bits by slot.
    #[inline(always)]
    pub fn open_mask(&self) -> ScopeMask {
        self.open
    }

    /// A scope opened in `slot` at `epoch`: it counts blocks allocated from now on.
    pub fn scope_opened(&mut self, slot: usize, epoch: u32) {
        self.open |= 1 << slot;
        self.epochs[slot] = epoch;
    }

    /// The scope in `slot` closed: no block counts in it any more.
    pub fn scope_closed(&mut self, slot: usize) {
        let bit = 1 << slot;
        self.open &= !bit;
        for counting in &mut self.counting[..=self.classes.len()] {
            *counting &= !bit;
        }
    }

    /// The open scopes that count `block`: those among its mask opened no later than it.
    pub fn counting(&self, block: &Block) -> ScopeMask {
        slots(block.mask & self.open)
            .filter(|&slot| self.epochs[slot] <= block.epoch)
            .fold(0, |mask, slot| mask | 1 << slot)
    }

    /// Leaf `index` of region `key`, when it is there.
    #[inline(always)]
    fn leaf(&mut self, key: usize, index: usize) -> Option<&mut Leaf> {
        self.top[key]
            .as_mut()
            .and_then(|region| region[index].as_mut())
    }

    /// Leaf `index` of region `key`, made if need be (and its region).
    #[inline]
    fn leaf_made(&mut self, key: usize, index: usize) -> &mut Leaf {
        let Blocks {
            top,
            region_keys,
            spare,
            in_use,
            ..
        } = self;
        let region = match &mut top[key] {
            Some(region) => region,
            empty => new_region(empty, region_keys, key),
        };
        match &mut region[index] {
            Some(leaf) => leaf,
            empty => new_leaf(empty, in_use, spare, key, index),
        }
    }

    /// The word of `address`, its leaf made if need be.
    #[inline]
    fn word_mut(&mut self, address: usize) -> Option<&mut u64> {
        let (key, index, word) = word_index(address)?;
        let leaf = self.leaf_made(key, index);
        leaf.dirty |= 1 << (word >> CHUNK_BITS);
        Some(&mut leaf.words[word])
    }

    /// The class of blocks allocated under `mask` at `epoch`, interned, for
    /// [`Blocks::insert_new`]: [`IN_TABLE`] when the classes ran out.
    pub fn class_of(&mut self, mask: ScopeMask, epoch: u32) -> u64 {
        self.class(mask, epoch, true).unwrap_or(IN_TABLE)
    }

    #[inline]
    /// `may_reclaim`: whether running out of classes may scan for free slots (from
    /// [`Blocks::class_of`], once per membership; not for each block that goes to the table).
    fn class(&mut self, mask: ScopeMask, epoch: u32, may_reclaim: bool) -> Option<u64> {
        let (last_mask, last_epoch, class) = self.last_class;
        if (last_mask, last_epoch) == (mask, epoch) && class != 0 {
            return Some(class);
        }
        self.find_class(mask, epoch, may_reclaim)
    }

    #[cold]
    fn find_class(&mut self, mask: ScopeMask, epoch: u32, may_reclaim: bool) -> Option<u64> {
        let found = self
            .classes
            .iter()
            .rposition(|&class| class == (mask, epoch));
        let index = match found {
            Some(index) => index,
            None => {
                let index = if self.classes.len() < MAX_CLASSES {
                    self.classes.push((mask, epoch));
                    self.classes.len() - 1
                } else {
                    let slot = match self.free_classes.pop() {
                        Some(slot) => slot,
                        None if may_reclaim => {
                            self.reclaim_classes(epoch);
                            self.free_classes.pop()?
                        }
                        None => return None,
                    };
                    let index = usize::from(slot) - 1;
                    self.classes[index] = (mask, epoch);
                    index
                };
                self.counting[index + 1] = self.counting(&Block {
                    mask,
                    epoch,
                    ..Block::EMPTY
                });
                index
            }
        };
        let class = index as u64 + 1;
        self.last_class = (mask, epoch, class);
        Some(class)
    }

    /// Gives back the class slots no word of the shadow map holds (blocks in the table keep
    /// their mask and epoch, not a class). Slots of classes made at `epoch`, the newest, are
    /// kept: a membership cached by the hooks may name one that no block carries yet. (Every
    /// membership is computed again when a scope opens or closes, and a class is made for the
    /// newest epoch only.)
    #[cold]
    #[inline(never)]
    fn reclaim_classes(&mut self, epoch: u32) {
        if self.reclaim_wait > 0 {
            self.reclaim_wait -= 1;
            return;
        }
        let mut used = [false; 256];
        for &(key, index) in &self.in_use {
            let Some(leaf) = self.top[key]
                .as_ref()
                .and_then(|region| region[index].as_ref())
            else {
                continue;
            };
            let chunks = leaf.words.chunks(1 << CHUNK_BITS).enumerate();
            for (_, words) in chunks.filter(|(chunk, _)| leaf.dirty & 1 << chunk != 0) {
                for word in words {
                    used[(word >> CLASS_SHIFT) as usize] = true;
                }
            }
        }
        let before = self.free_classes.len();
        for (index, class) in self.classes.iter_mut().enumerate() {
            if !used[index + 1] && *class != FREE_CLASS && class.1 < epoch {
                *class = FREE_CLASS;
                self.counting[index + 1] = 0;
                self.free_classes.push((index + 1) as u8);
            }
        }
        let last = self.last_class.2 as usize;
        if last != 0 && self.classes.get(last - 1) == Some(&FREE_CLASS) {
            self.last_class = (0, 0, 0);
        }
        if self.free_classes.len() - before < RECLAIM_ENOUGH {
            self.reclaim_wait = RECLAIM_WAIT;
        }
    }

    #[inline]
    fn pack(&mut self, block: &Block) -> u64 {
        match self.class(block.mask, block.epoch, false) {
            Some(class) if fits(block.size, block.site) => word(block.size, block.site, class),
            _ => IN_TABLE << CLASS_SHIFT,
        }
    }

    fn unpack(&self, word: u64) -> Block {
        let (mask, epoch) = self.classes[(word >> CLASS_SHIFT) as usize - 1];
        Block {
            size: (word & ((1 << SIZE_BITS) - 1)) as usize,
            site: ((word >> SIZE_BITS) & ((1 << SITE_BITS) - 1)) as SiteId,
            mask,
            epoch,
        }
    }

    /// Inserts a block of `class` ([`Blocks::class_of`]) into an empty word of the shadow map:
    /// an allocation's hot path. Returns false, having recorded nothing, when the block needs
    /// [`Blocks::insert`]: the address or the figures do not fit a word, or the word is taken
    /// (a free no hook saw).
    #[inline(always)]
    pub fn insert_new(&mut self, address: usize, size: usize, site: SiteId, class: u64) -> bool {
        if !fits(size, site) || class == IN_TABLE {
            return false;
        }
        let Some((key, index, word)) = word_index(address) else {
            return false;
        };
        self.leaf_made(key, index)
            .claim(word, self::word(size, site, class))
    }

    /// [`Blocks::insert_new`] for a class that [`is_word_class`], into a leaf that is there
    /// already: the hooks' fast path. Returns false, having recorded nothing, when the block
    /// needs [`Blocks::insert_new`].
    #[inline(always)]
    pub fn insert_in_leaf(
        &mut self,
        address: usize,
        size: usize,
        site: SiteId,
        class: u64,
    ) -> bool {
        debug_assert!(is_word_class(class));
        if !fits(size, site) {
            return false;
        }
        let Some((key, index, word)) = word_index(address) else {
            return false;
        };
        // A let-else, not `is_some_and`: its closure was not inlined.
        let Some(leaf) = self.leaf(key, index) else {
            return false;
        };
        leaf.claim(word, self::word(size, site, class))
    }

    /// Inserts or replaces; returns the block that was there.
    pub fn insert(&mut self, address: usize, block: Block) -> Option<Block> {
        let packed = self.pack(&block);
        let Some(word) = self.word_mut(address) else {
            return self.table.insert(address, block);
        };
        let old = std::mem::replace(word, packed);
        let old = self.take(address, old);
        if packed >> CLASS_SHIFT == IN_TABLE {
            self.table.insert(address, block);
        }
        old
    }

    /// The block an old word stood for (its table entry is removed).
    fn take(&mut self, address: usize, word: u64) -> Option<Block> {
        match word >> CLASS_SHIFT {
            0 => None,
            IN_TABLE => self.table.remove(address),
            _ => Some(self.unpack(word)),
        }
    }

    /// Takes the word of `address` out of the shadow map: 0 when there is none, a word of
    /// class [`IN_TABLE`] when the address has no word (so the table is asked).
    #[inline]
    fn take_word(&mut self, address: usize) -> u64 {
        match word_index(address) {
            Some((key, index, word)) => self
                .leaf(key, index)
                .map_or(0, |leaf| std::mem::take(&mut leaf.words[word])),
            None => IN_TABLE << CLASS_SHIFT,
        }
    }

    /// Removes a block, for a free: its size, its site and the open scopes that count it (none
    /// when there is no such block: an empty word's class counts nowhere).
    #[inline(always)]
    pub fn remove_counted(&mut self, address: usize) -> (u64, SiteId, ScopeMask) {
        let word = self.take_word(address);
        let class = word >> CLASS_SHIFT;
        if class == IN_TABLE {
            return self.remove_from_table(address);
        }
        (
            word & ((1 << SIZE_BITS) - 1),
            ((word >> SIZE_BITS) & ((1 << SITE_BITS) - 1)) as SiteId,
            self.counting[class as usize],
        )
    }

    #[cold]
    fn remove_from_table(&mut self, address: usize) -> (u64, SiteId, ScopeMask) {
        match self.table.remove(address) {
            Some(block) => (block.size as u64, block.site, self.counting(&block)),
            None => (0, NATIVE_SITE, 0),
        }
    }

    pub fn remove(&mut self, address: usize) -> Option<Block> {
        let word = self.take_word(address);
        self.take(address, word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(size: usize) -> Block {
        Block {
            size,
            ..Block::EMPTY
        }
    }

    #[test]
    fn insert_replace_remove() {
        let mut table = BlockTable::default();
        assert_eq!(table.insert(0x1000, block(1)), None);
        assert_eq!(table.insert(0x1000, block(2)), Some(block(1)));
        assert_eq!(table.len(), 1);
        assert_eq!(table.remove(0x2000), None);
        assert_eq!(table.remove(0x1000), Some(block(2)));
        assert_eq!(table.remove(0x1000), None);
        assert!(table.is_empty());
    }

    fn scoped(size: usize, site: SiteId, mask: ScopeMask, epoch: u32) -> Block {
        Block {
            size,
            site,
            mask,
            epoch,
        }
    }

    #[test]
    fn words_and_table_hold_what_does_not_fit() {
        let mut blocks = Blocks::default();
        let plain = scoped(100, 3, 1, 1);
        let huge = scoped(1 << 40, 3, 1, 1);
        let many_sites = scoped(8, 1 << 21, 1, 1);
        assert_eq!(blocks.insert(0x7f00_0000_1000, plain), None);
        assert_eq!(blocks.insert(0x7f00_0000_2000, huge), None);
        assert_eq!(blocks.insert(0x7f00_0000_3000, many_sites), None);
        assert_eq!(blocks.insert(0x7f00_0000_3008, plain), None); // 8-aligned only
        assert_eq!(blocks.insert(1 << 50, plain), None); // beyond 48 bits
        assert_eq!(blocks.len(), 5);
        assert_eq!(blocks.insert(0x7f00_0000_2000, plain), Some(huge));
        assert_eq!(blocks.remove(0x7f00_0000_2000), Some(plain));
        assert_eq!(blocks.remove(0x7f00_0000_1000), Some(plain));
        assert_eq!(blocks.remove(0x7f00_0000_3000), Some(many_sites));
        assert_eq!(blocks.remove(0x7f00_0000_3008), Some(plain));
        assert_eq!(blocks.remove(1 << 50), Some(plain));
        assert_eq!(blocks.remove(0x7f00_0000_1000), None);
        assert!(blocks.is_empty());
    }

    #[test]
    fn clear_forgets_everything_and_keeps_clean_leaves() {
        let mut blocks = Blocks::default();
        let plain = scoped(100, 3, 1, 1);
        for leaf in 0..40usize {
            blocks.insert(0x7f00_0000_0000 + (leaf << 20) + 4096 * leaf, plain);
        }
        blocks.insert(0x1008, plain);
        blocks.clear();
        assert!(blocks.is_empty());
        assert_eq!(blocks.spare.len(), 40);
        assert!(blocks.spare.iter().all(|leaf| leaf.dirty == 0));
        for leaf in 0..40usize {
            assert_eq!(
                blocks.remove(0x7f00_0000_0000 + (leaf << 20) + 4096 * leaf),
                None
            );
        }
        assert_eq!(blocks.remove(0x1008), None);
        // A new leaf anywhere comes from the spares, clean.
        assert_eq!(blocks.insert(0x5500_0000_0000, plain), None);
        assert_eq!(blocks.spare.len(), 39);
        assert_eq!(blocks.remove(0x5500_0000_0000), Some(plain));
        assert_eq!(blocks.insert(0x7f00_0000_0000, plain), None);
    }

    #[test]
    fn regions_anywhere_in_the_address_space() {
        let mut blocks = Blocks::default();
        let plain = scoped(100, 3, 1, 1);
        // Twelve regions, from the bottom of the address space to the top of 48 bits.
        let addresses: Vec<usize> = (0..12usize)
            .map(|region| ((region * 0x1555) << 32) + 0x40)
            .chain([(1 << 48) - 16])
            .collect();
        for &address in &addresses {
            assert_eq!(blocks.insert(address, plain), None);
        }
        assert_eq!(blocks.len(), addresses.len());
        blocks.clear();
        assert_eq!(blocks.region_keys.len(), KEEP_REGIONS);
        let made = blocks.top.iter().filter(|region| region.is_some()).count();
        assert_eq!(made, KEEP_REGIONS);
        for &address in &addresses {
            assert_eq!(blocks.remove(address), None);
            assert_eq!(blocks.insert(address, plain), None);
            assert_eq!(blocks.remove(address), Some(plain));
        }
        assert!(blocks.is_empty());
    }

    #[test]
    fn classes_overflow_into_the_table() {
        let mut blocks = Blocks::default();
        for epoch in 0..600u32 {
            let address = 0x1000 + 16 * epoch as usize;
            blocks.insert(address, scoped(epoch as usize, 1, 1, epoch));
        }
        for epoch in 0..600u32 {
            let address = 0x1000 + 16 * epoch as usize;
            assert_eq!(
                blocks.remove(address),
                Some(scoped(epoch as usize, 1, 1, epoch))
            );
        }
    }

    #[test]
    fn classes_no_block_holds_are_given_back() {
        // A scope opening inside another, a thousand times (first uses measured apart): each
        // makes a class. Most stretches' blocks go; every tenth stays, and keeps its class.
        let mut blocks = Blocks::default();
        let kept: Vec<u32> = (0..1000u32).filter(|epoch| epoch % 10 == 0).collect();
        for epoch in 0..1000u32 {
            let address = 0x10_0000 + 16 * epoch as usize;
            // As the tracker records an allocation: the class of its membership, then the word.
            let class = blocks.class_of(1 << (epoch % 3), epoch);
            if !blocks.insert_new(address, 64, 1, class) {
                blocks.insert(address, scoped(64, 1, 1 << (epoch % 3), epoch));
            }
            if epoch % 10 != 0 {
                assert_eq!(
                    blocks.remove(address),
                    Some(scoped(64, 1, 1 << (epoch % 3), epoch))
                );
            }
        }
        // The slots came back: every block is a word of the shadow map, none in the table.
        assert_eq!(blocks.table.len(), 0);
        for &epoch in &kept {
            let address = 0x10_0000 + 16 * epoch as usize;
            assert_eq!(
                blocks.remove(address),
                Some(scoped(64, 1, 1 << (epoch % 3), epoch)),
                "epoch {epoch}"
            );
        }
        assert!(blocks.is_empty());
    }

    proptest::proptest! {
        /// The shadow map agrees with `HashMap`, whatever mix of alignments, sizes and classes.
        #[test]
        fn blocks_behave_like_a_map(ops in proptest::collection::vec((1usize..4000, 0usize..3, 0u32..4, proptest::bool::ANY), 1..2000)) {
            let mut blocks = Blocks::default();
            let mut model = std::collections::HashMap::new();
            for (unit, kind, epoch, remove) in ops {
                let address = unit * 8 + (1 << 20) * (unit % 3);
                let block = scoped([7, 1 << 37, 4096][kind], [2, 1 << 22, 5][kind], 1 << epoch, epoch);
                if remove {
                    proptest::prop_assert_eq!(blocks.remove(address), model.remove(&address));
                } else {
                    proptest::prop_assert_eq!(blocks.insert(address, block), model.insert(address, block));
                }
            }
            proptest::prop_assert_eq!(blocks.len(), model.len());
        }

        /// The table agrees with `HashMap` through growth and any mix of inserts and removes,
        /// including addresses that collide in a small table.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((1usize..3000, 0usize..100, proptest::bool::ANY), 1..3000)) {
            let mut table = BlockTable::default();
            let mut model = std::collections::HashMap::new();
            for (unit, size, remove) in ops {
                let address = unit * 16;
                if remove {
                    proptest::prop_assert_eq!(table.remove(address), model.remove(&address).map(block));
                } else {
                    proptest::prop_assert_eq!(table.insert(address, block(size)), model.insert(address, size).map(block));
                }
                proptest::prop_assert_eq!(table.len(), model.len());
            }
            for (address, size) in model {
                proptest::prop_assert_eq!(table.remove(address), Some(block(size)));
            }
        }
    }
}
