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
//!   beyond 48 bits, sizes of 64 GiB and more, site ids past 2^20, more than 254 scope classes.
//!
//! The leaves cost, in resident memory, at most half the span of small blocks they cover
//! (8 bytes per 16); a hash entry per small block costs about as much. All of it goes when the
//! last scope closes.

use crate::tracker::{Block, ScopeMask, SiteId};

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
const LEAF_BITS: u32 = 16;
const MID_BITS: u32 = 15;
const TOP_BITS: u32 = 48 - GRANULE_BITS - LEAF_BITS - MID_BITS;

const SIZE_BITS: u32 = 36;
const SITE_BITS: u32 = 20;
const CLASS_SHIFT: u32 = SIZE_BITS + SITE_BITS;
/// A word's class: 0 is an empty word, [`IN_TABLE`] sends the lookup to the hash table.
const IN_TABLE: u64 = 0xFF;
const MAX_CLASSES: usize = IN_TABLE as usize - 1;

type Leaf = Box<[u64]>;
type Mid = Box<[Option<Leaf>]>;

/// Where the blocks are: the shadow map, and the table for what does not fit it.
pub struct Blocks {
    top: Box<[Option<Mid>]>,
    table: BlockTable,
    /// The (scope mask, epoch) pairs blocks carry, interned: word class `i + 1` is `classes[i]`.
    classes: Vec<(ScopeMask, u32)>,
    len: usize,
}

impl Default for Blocks {
    fn default() -> Self {
        Self {
            top: vec![None; 1 << TOP_BITS].into_boxed_slice(),
            table: BlockTable::default(),
            classes: Vec::new(),
            len: 0,
        }
    }
}

/// Where an address's word is: top, mid and leaf index; `None` when it cannot have one.
fn word_index(address: usize) -> Option<(usize, usize, usize)> {
    let address = address as u64;
    if address & ((1 << GRANULE_BITS) - 1) != 0 || address >> 48 != 0 {
        return None;
    }
    let granule = address >> GRANULE_BITS;
    let leaf = (granule & ((1 << LEAF_BITS) - 1)) as usize;
    let mid = ((granule >> LEAF_BITS) & ((1 << MID_BITS) - 1)) as usize;
    let top = (granule >> (LEAF_BITS + MID_BITS)) as usize;
    Some((top, mid, leaf))
}

impl Blocks {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The word of `address` when its leaf exists.
    fn existing_word(&mut self, address: usize) -> Option<&mut u64> {
        let (top, mid, leaf) = word_index(address)?;
        let leaves = self.top[top].as_mut()?;
        Some(&mut leaves[mid].as_mut()?[leaf])
    }

    fn word_mut(&mut self, address: usize) -> Option<&mut u64> {
        let (top, mid, leaf) = word_index(address)?;
        let leaves = self.top[top].get_or_insert_with(|| vec![None; 1 << MID_BITS].into());
        let words = leaves[mid].get_or_insert_with(|| vec![0u64; 1 << LEAF_BITS].into());
        Some(&mut words[leaf])
    }

    fn class(&mut self, mask: ScopeMask, epoch: u32) -> Option<u64> {
        // The newest class is nearly always the one wanted.
        let found = self
            .classes
            .iter()
            .rposition(|&class| class == (mask, epoch));
        let index = match found {
            Some(index) => index,
            None if self.classes.len() < MAX_CLASSES => {
                self.classes.push((mask, epoch));
                self.classes.len() - 1
            }
            None => return None,
        };
        Some(index as u64 + 1)
    }

    fn pack(&mut self, block: &Block) -> u64 {
        let fits = (block.size as u64) >> SIZE_BITS == 0 && block.site >> SITE_BITS == 0;
        match self.class(block.mask, block.epoch) {
            Some(class) if fits => {
                block.size as u64 | u64::from(block.site) << SIZE_BITS | class << CLASS_SHIFT
            }
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

    /// Inserts or replaces; returns the block that was there.
    pub fn insert(&mut self, address: usize, block: Block) -> Option<Block> {
        let packed = self.pack(&block);
        let Some(word) = self.word_mut(address) else {
            let old = self.table.insert(address, block);
            return self.finish_insert(old);
        };
        let old = std::mem::replace(word, packed);
        let old = self.take(address, old);
        if packed >> CLASS_SHIFT == IN_TABLE {
            self.table.insert(address, block);
        }
        self.finish_insert(old)
    }

    fn finish_insert(&mut self, old: Option<Block>) -> Option<Block> {
        if old.is_none() {
            self.len += 1;
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

    pub fn remove(&mut self, address: usize) -> Option<Block> {
        let old = if word_index(address).is_some() {
            let word = self.existing_word(address).map_or(0, std::mem::take);
            self.take(address, word)
        } else {
            self.table.remove(address)
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
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
                proptest::prop_assert_eq!(blocks.len(), model.len());
            }
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
