//! The plaintext of WAL frames this process sealed, kept so that reading a
//! frame back (a checkpoint copying it into the database, a reader taking
//! a page from the WAL) can skip opening it.
//!
//! A checkpoint reads every frame it copies, so without this each changed
//! page is opened once more by every layer between its two seals (WAL,
//! then database): a third of the cipher work of a write.
//!
//! An entry answers a read only when the sealed unit on disk is byte for
//! byte the one this process wrote, under the same keys (their epoch) and
//! the same WAL generation. Opening is deterministic, so opening those
//! bytes under those keys and that context would give exactly the stored
//! plaintext: a hit is the open's result, without its cost, and tamper
//! detection is unchanged (any other bytes miss and are opened and checked
//! as before). What it is not: a cache of database pages (SQLite's page
//! cache is that), or shared between processes.
//!
//! Memory is bounded ([`FrameMemo::CAP_BYTES`] per WAL, about SQLite's
//! default auto-checkpoint window of 1000 frames of 4 KiB), plaintext is
//! zeroized when an entry is overwritten or dropped, and a WAL truncated
//! to zero drops all entries.

use std::collections::HashMap;

use zeroize::{Zeroize, Zeroizing};

/// One frame as this process sealed it.
pub(crate) struct Entry {
    /// The keys' epoch and the WAL generation the frame was sealed under.
    epoch: u64,
    generation: u64,
    /// The unit as written to disk (clear salts prefix, sealed part).
    sealed: Vec<u8>,
    /// The sealed part's plaintext, without the trailer (which an open
    /// leaves zero).
    plain: Zeroizing<Vec<u8>>,
}

impl Entry {
    /// Where the plaintext goes before the seal: `len` bytes, which the
    /// caller overwrites whole (so the old plaintext needs no zeroizing
    /// unless the length changes; `Zeroizing` wipes the last on drop).
    pub(crate) fn plain_mut(&mut self, len: usize) -> &mut [u8] {
        if self.plain.len() != len {
            self.plain.zeroize();
            self.plain.resize(len, 0);
        }
        &mut self.plain
    }

    /// Records what the seal wrote.
    pub(crate) fn sealed_as(&mut self, epoch: u64, generation: u64, unit: &[u8]) {
        self.epoch = epoch;
        self.generation = generation;
        self.sealed.clear();
        self.sealed.extend_from_slice(unit);
    }
}

#[derive(Default)]
pub(crate) struct FrameMemo {
    entries: HashMap<u64, Entry>,
    /// Entries handed out by `take` and not put back yet.
    out: usize,
}

impl FrameMemo {
    /// Bytes of memo per WAL (sealed copy and plaintext of each frame).
    pub(crate) const CAP_BYTES: usize = 8 << 20;

    /// The entry for frame `index`, taken out while the frame is sealed
    /// (so no read can match it half-written): the old one to reuse, a new
    /// one, or `None` when the memo is full.
    pub(crate) fn take(&mut self, index: u64, unit_len: usize) -> Option<Entry> {
        let entry = match self.entries.remove(&index) {
            Some(e) => e,
            None if (self.entries.len() + self.out + 1) * 2 * unit_len <= Self::CAP_BYTES => {
                Entry {
                    epoch: 0,
                    generation: 0,
                    sealed: Vec::with_capacity(unit_len),
                    plain: Zeroizing::new(Vec::with_capacity(unit_len)),
                }
            }
            None => return None,
        };
        self.out += 1;
        Some(entry)
    }

    /// Puts back an entry taken for frame `index`, sealed and written.
    pub(crate) fn put(&mut self, index: u64, entry: Entry) {
        self.out = self.out.saturating_sub(1);
        self.entries.insert(index, entry);
    }

    /// An entry taken and not put back (the write failed): it is dropped.
    pub(crate) fn abandon(&mut self, entry: Entry) {
        self.out = self.out.saturating_sub(1);
        drop(entry);
    }

    /// If `unit` (as read from disk: clear prefix and sealed part) is the
    /// one sealed for frame `index` under `epoch` and `generation`, writes
    /// its plaintext over the sealed part (`unit[prefix..]`, trailer
    /// zeroed, as an open leaves it) and returns true.
    pub(crate) fn recall(
        &self,
        index: u64,
        epoch: u64,
        generation: u64,
        unit: &mut [u8],
        prefix: usize,
    ) -> bool {
        let Some(e) = self.entries.get(&index) else {
            return false;
        };
        if e.epoch != epoch || e.generation != generation || e.sealed[..] != unit[..] {
            return false;
        }
        let body = &mut unit[prefix..];
        body[..e.plain.len()].copy_from_slice(&e.plain);
        body[e.plain.len()..].fill(0);
        true
    }

    /// Drops every entry (their plaintext is zeroized).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remember(m: &mut FrameMemo, index: u64, epoch: u64, generation: u64, unit: &[u8]) -> bool {
        let Some(mut e) = m.take(index, unit.len()) else {
            return false;
        };
        e.plain_mut(unit.len() - 8 - 4)
            .copy_from_slice(&[index as u8; 4084][..unit.len() - 12]);
        e.sealed_as(epoch, generation, unit);
        m.put(index, e);
        true
    }

    #[test]
    fn only_the_exact_unit_under_the_same_keys_and_generation_is_recalled() {
        let mut m = FrameMemo::default();
        let unit: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        assert!(remember(&mut m, 3, 1, 0xAB, &unit));
        let mut got = unit.clone();
        assert!(m.recall(3, 1, 0xAB, &mut got, 8));
        assert_eq!(&got[..8], &unit[..8], "the clear prefix is left alone");
        assert!(got[8..8 + 4084 - 8].iter().all(|&b| b == 3));
        assert_eq!(&got[4092..], &[0; 4], "the trailer reads as zeros");
        // Any other bytes, keys, generation or frame: no answer, and the
        // unit is left as read (to be opened and checked).
        for (index, epoch, generation, flip) in [
            (3, 1, 0xAB, Some(0)),
            (3, 1, 0xAB, Some(2000)),
            (3, 1, 0xAB, Some(4095)),
            (3, 2, 0xAB, None),
            (3, 1, 0xAC, None),
            (4, 1, 0xAB, None),
        ] {
            let mut read = unit.clone();
            if let Some(at) = flip {
                read[at] ^= 0x10;
            }
            let before = read.clone();
            assert!(!m.recall(index, epoch, generation, &mut read, 8));
            assert_eq!(read, before);
        }
        // Taken out while it is re-sealed: no answer meanwhile.
        let e = m.take(3, unit.len()).unwrap();
        assert!(!m.recall(3, 1, 0xAB, &mut unit.clone(), 8));
        m.abandon(e);
        assert!(!m.recall(3, 1, 0xAB, &mut unit.clone(), 8));
        assert!(remember(&mut m, 3, 1, 0xAB, &unit));
        m.clear();
        assert!(!m.recall(3, 1, 0xAB, &mut unit.clone(), 8));
    }

    #[test]
    fn memory_is_bounded_but_known_frames_are_still_updated() {
        let mut m = FrameMemo::default();
        let unit = vec![1u8; 4096];
        let fit = FrameMemo::CAP_BYTES / (2 * unit.len());
        for i in 0..fit as u64 {
            assert!(remember(&mut m, i, 0, 0, &unit));
        }
        assert!(!remember(&mut m, fit as u64, 0, 0, &unit), "full");
        assert_eq!(m.len(), fit);
        let mut changed = unit.clone();
        changed[100] = 9;
        assert!(remember(&mut m, 5, 0, 0, &changed), "an entry is reused");
        assert!(m.recall(5, 0, 0, &mut changed.clone(), 8));
        assert!(!m.recall(5, 0, 0, &mut unit.clone(), 8));
    }
}
