//! The table of live blocks: address → what the tracker knows about the block.
//!
//! Every traced allocation inserts here and every free looks up, so this is the engine's hot
//! spot. An open-addressing table with linear probing and backward-shift deletion (no
//! tombstones, so heavy churn never degrades it) keeps each operation to one or two cache lines,
//! and [`BlockTable::prefetch`] lets the tracker start the memory load for an event a few events
//! ahead of applying it. `std`'s `HashMap` cost twice as much per operation on a recorded trace
//! of the allocation benchmark (`bench/engine.py`).

use crate::tracker::Block;

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

    /// Starts loading the cache line where `address` would be found.
    pub fn prefetch(&self, address: usize) {
        crate::ffi::prefetch(&self.slots[self.home(address)]);
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

    proptest::proptest! {
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
