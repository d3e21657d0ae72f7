//! Where a unit's slots sit in a ciphertext file. Pure arithmetic.
//!
//! ```text
//! [header slot 0: 4 KiB][header slot 1: 4 KiB][body]
//! one slot per unit:   body = slot(0) slot(1) slot(2) ...
//! two slots per unit:  body = group 0, group 1, ...
//!                      group = map slot A, map slot B, then for each of its
//!                              GROUP_UNITS units: slot A, slot B
//! slot = meta (16: sequence u64, length u32, zero u32) | sealed unit (length + 28) | zero pad
//! ```
//!
//! Every slot of a file has the same size: [`SLOT`], or [`INFRA_SLOT`] when
//! the infrastructure layer adds its trailer (`| AEGIS tag 16 | nonce 32`
//! after the data layer's sealed unit). A unit's plaintext is at most
//! [`UNIT`] bytes (the last unit of a file may be shorter).

use atrest_crypto::{HEADER_SLOT_SIZE, INFRA_OVERHEAD, SEAL_OVERHEAD};

/// Plaintext bytes per unit: PostgreSQL's page and WAL block size, so a
/// page write is exactly one unit and never reads the old unit.
pub const UNIT: usize = 8192;
/// The clear metadata at the start of each slot.
pub const META: usize = 16;
/// Bytes per physical slot (data layer only).
pub const SLOT: usize = META + UNIT + SEAL_OVERHEAD;
/// Bytes per physical slot with the infrastructure layer.
pub const INFRA_SLOT: usize = SLOT + INFRA_OVERHEAD;
/// The two header slots before the body.
pub const HEADER_LEN: u64 = 2 * HEADER_SLOT_SIZE as u64;
/// Units per sequence-map group (two-slot files): the map of a group is
/// one unit of `GROUP_UNITS` sequence numbers.
pub const GROUP_UNITS: u64 = (UNIT / 8) as u64;

/// The physical layout of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub slots: u8,
    /// The infrastructure layer's trailer is in every slot.
    pub infra: bool,
}

impl Layout {
    /// Bytes per slot in this file.
    pub const fn slot(self) -> usize {
        if self.infra {
            INFRA_SLOT
        } else {
            SLOT
        }
    }

    const fn group_len(self) -> u64 {
        2 * self.slot() as u64 + GROUP_UNITS * 2 * self.slot() as u64
    }

    /// Offset of slot `k` of unit `i`.
    pub fn slot_offset(self, i: u64, k: u8) -> u64 {
        debug_assert!(k < self.slots);
        if self.slots == 1 {
            HEADER_LEN + i * self.slot() as u64
        } else {
            let (g, j) = (i / GROUP_UNITS, i % GROUP_UNITS);
            HEADER_LEN + g * self.group_len() + (2 + 2 * j + k as u64) * self.slot() as u64
        }
    }

    /// Offset of map slot `k` of group `g` (two-slot files only).
    pub fn map_offset(self, g: u64, k: u8) -> u64 {
        debug_assert_eq!(self.slots, 2);
        HEADER_LEN + g * self.group_len() + k as u64 * self.slot() as u64
    }

    /// Units that have at least one complete slot in a file of `physical`
    /// bytes (a slot cut short by a crash does not count).
    pub fn units_in(self, physical: u64) -> u64 {
        let Some(rel) = physical.checked_sub(HEADER_LEN) else {
            return 0;
        };
        let s = self.slot() as u64;
        if self.slots == 1 {
            return rel / s;
        }
        let (g, rem) = (rel / self.group_len(), rel % self.group_len());
        let in_group = match rem.checked_sub(2 * s) {
            Some(r) if r >= s => (r - s) / (2 * s) + 1,
            _ => 0,
        };
        g * GROUP_UNITS + in_group
    }

    /// The physical length that holds units `0..n` and nothing more.
    pub fn physical_len(self, n: u64) -> u64 {
        if n == 0 {
            HEADER_LEN
        } else {
            self.slot_offset(n - 1, self.slots - 1) + self.slot() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_overlap_and_units_in_inverts_physical_len() {
        for (slots, infra) in [(1u8, false), (2, false), (1, true), (2, true)] {
            let l = Layout { slots, infra };
            let slot = l.slot() as u64;
            let mut ends = vec![];
            for i in 0..(3 * GROUP_UNITS + 5) {
                for k in 0..slots {
                    ends.push((l.slot_offset(i, k), l.slot_offset(i, k) + slot));
                }
                if slots == 2 && i % GROUP_UNITS == 0 {
                    for k in 0..2 {
                        let o = l.map_offset(i / GROUP_UNITS, k);
                        ends.push((o, o + slot));
                    }
                }
            }
            ends.sort();
            for w in ends.windows(2) {
                assert!(w[0].1 <= w[1].0, "{slots} slots: {w:?} overlap");
            }
            for n in 0..(3 * GROUP_UNITS + 5) {
                assert_eq!(l.units_in(l.physical_len(n)), n, "{slots} slots, {n} units");
                // One byte short of the last slot: one unit fewer when one slot holds it.
                if n > 0 && slots == 1 {
                    assert_eq!(l.units_in(l.physical_len(n) - 1), n - 1);
                }
                if n > 0 && slots == 2 {
                    // Slot A of the last unit complete, slot B not written: still n.
                    let a_end = l.slot_offset(n - 1, 0) + slot;
                    assert_eq!(l.units_in(a_end), n);
                    assert_eq!(l.units_in(a_end - 1), n - 1);
                }
            }
        }
    }
}
