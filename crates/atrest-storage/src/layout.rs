//! Where each logical byte SQLite sees lives in the physical file, and how
//! it is sealed. Pure arithmetic: no I/O, no keys.
//!
//! Every file but a temp file starts with [`HEADER_LEN`] bytes of header
//! (two slots). After it, the logical content is cut into *units*, each
//! sealed on its own:
//!
//! * database file: one unit per page, sealed *in place*: the tag and the
//!   nonce take SQLite's reserved bytes, so a page is exactly one page on
//!   disk and the logical offset maps to `HEADER_LEN + offset`;
//! * WAL (header format 4): the 32-byte WAL header (28 bytes appended),
//!   then per frame ONE unit: the 24-byte frame header and the page sealed
//!   together, in place (the tag and nonce take the page's reserved
//!   bytes), with the frame's salts in clear in front (8 bytes; random
//!   values that tell a frame of an older WAL generation from a damaged
//!   one). Frame headers carry SQLite checksums computed over plaintext, so
//!   they must be sealed; sealing them with their page costs one seal and
//!   one write per frame instead of two. SQLite writes a frame as two
//!   writes (header, then page); the file layer buffers the header until
//!   the page comes (`file.rs`). WALs of formats 1 and 3 sealed the frame
//!   header (28 bytes appended) and the page as two units;
//! * journals and temp files: blocks of [`JOURNAL_BLOCK`] (journals: one
//!   aligned 4 KiB page on disk each) or [`TEMP_BLOCK`] logical bytes, each
//!   with 28 bytes appended; the last block may be short.
//!
//! The 28 bytes are the *overhead* of the data layer. With the
//! infrastructure layer on, each unit carries 48 more (its AEGIS-256 tag,
//! 16, and nonce, 32) after the data layer's: the overhead is 76, a journal
//! block holds `4096 - 76` logical bytes, and SQLite's reserve is 76. The
//! overhead is a property of the file (its header names its layers).

use atrest_crypto::{HEADER_SLOT_SIZE, SEAL_OVERHEAD};

/// Two header slots.
pub const HEADER_LEN: u64 = 2 * HEADER_SLOT_SIZE as u64;
/// Logical bytes per block of a journal or super-journal: with its tag and
/// nonce a block is exactly 4 KiB on disk, page-aligned, so one block write
/// never spans two pages of the OS page cache. (A write spanning two can be
/// cut in half by SIGKILL: Linux checks for fatal signals between pages.)
#[allow(dead_code)] // the data-layer-only size; files use `journal_block(ov)`
pub const JOURNAL_BLOCK: usize = journal_block(SEAL_OVERHEAD);
/// Logical bytes per block of a temp file (never read after a crash, so
/// alignment does not matter; 4 KiB keeps temp-database pages whole).
pub const TEMP_BLOCK: usize = 4096;
/// SQLite's WAL header and frame header sizes.
pub const WAL_HEADER: usize = 32;
pub const WAL_FRAME_HEADER: usize = 24;
/// Clear salts in front of each sealed frame header.
pub const WAL_SALT_PREFIX: usize = 8;

/// Logical bytes per journal block for a file whose units carry `ov` bytes
/// of tags and nonces: one aligned 4 KiB page on disk.
pub const fn journal_block(ov: usize) -> usize {
    4096 - ov
}
const fn wal_header_phys(ov: usize) -> u64 {
    (WAL_HEADER + ov) as u64
}
/// Physical bytes per WAL frame: clear salts, then the sealed frame header
/// and page (tag and nonce inside the page's reserved bytes).
const fn wal_frame_phys(page_size: usize) -> u64 {
    (WAL_SALT_PREFIX + WAL_FRAME_HEADER + page_size) as u64
}

/// What a unit is; bound into its AAD.
pub mod class {
    pub const PAGE: u16 = 1;
    pub const WAL_HEADER: u16 = 2;
    // 3 and 4 were the separately sealed WAL frame header and frame page
    // of WAL formats 1 and 3; never reused.
    pub const BLOCK: u16 = 5;
    /// A whole WAL frame: frame header and page, one unit (WAL format 4).
    pub const WAL_FRAME: u16 = 6;
}

/// One sealed unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    pub class: u16,
    /// Page number (from 1), frame number (from 0) or block number.
    pub index: u64,
    /// Logical start and length.
    pub lstart: u64,
    pub llen: usize,
    /// Physical start; the unit occupies [`Unit::plen`] bytes there.
    pub pstart: u64,
    /// Clear bytes in front of the sealed part (WAL frames only: salts).
    pub prefix: usize,
    /// True if tag and nonce follow the logical bytes; false if they sit
    /// in the unit's own last `ov` bytes (pages, WAL frames).
    pub appended: bool,
    /// Bytes of tags and nonces the unit carries (28, or 76 with the
    /// infrastructure layer).
    pub ov: usize,
}

impl Unit {
    pub fn plen(&self) -> usize {
        self.prefix + self.llen + if self.appended { self.ov } else { 0 }
    }
    /// A human name for error messages: "page 3", "WAL frame 7".
    pub fn describe(&self) -> String {
        match self.class {
            class::PAGE => format!("page {}", self.index),
            class::WAL_HEADER => "WAL header".to_string(),
            class::WAL_FRAME => format!("WAL frame {}", self.index + 1),
            _ => format!("block {}", self.index),
        }
    }
}

/// The unit layout of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    Pages {
        page_size: usize,
        base: u64,
        ov: usize,
    },
    Wal {
        page_size: usize,
        base: u64,
        ov: usize,
    },
    Blocks {
        base: u64,
        block: usize,
        ov: usize,
    },
}

impl Geometry {
    /// Logical bytes per unit (the page size for pages and WAL pages).
    pub fn unit_len(&self) -> usize {
        match *self {
            Geometry::Pages { page_size, .. } | Geometry::Wal { page_size, .. } => page_size,
            Geometry::Blocks { block, .. } => block,
        }
    }

    /// The unit holding logical byte `off`. For blocks this is the full-size
    /// block; the caller shortens the last one from the physical size.
    pub fn unit_at(&self, off: u64) -> Unit {
        match *self {
            Geometry::Pages {
                page_size,
                base,
                ov,
            } => {
                let p = page_size as u64;
                let i = off / p;
                Unit {
                    class: class::PAGE,
                    index: i + 1,
                    lstart: i * p,
                    llen: page_size,
                    pstart: base + i * p,
                    prefix: 0,
                    appended: false,
                    ov,
                }
            }
            Geometry::Wal {
                page_size,
                base,
                ov,
            } => {
                if off < WAL_HEADER as u64 {
                    return Unit {
                        class: class::WAL_HEADER,
                        index: 0,
                        lstart: 0,
                        llen: WAL_HEADER,
                        pstart: base,
                        prefix: 0,
                        appended: true,
                        ov,
                    };
                }
                let lframe = (WAL_FRAME_HEADER + page_size) as u64;
                let f = (off - WAL_HEADER as u64) / lframe;
                Unit {
                    class: class::WAL_FRAME,
                    index: f,
                    lstart: WAL_HEADER as u64 + f * lframe,
                    llen: WAL_FRAME_HEADER + page_size,
                    pstart: base + wal_header_phys(ov) + f * wal_frame_phys(page_size),
                    prefix: WAL_SALT_PREFIX,
                    appended: false,
                    ov,
                }
            }
            Geometry::Blocks { base, block, ov } => {
                let b = block as u64;
                let i = off / b;
                Unit {
                    class: class::BLOCK,
                    index: i,
                    lstart: i * b,
                    llen: block,
                    pstart: base + i * (b + ov as u64),
                    prefix: 0,
                    appended: true,
                    ov,
                }
            }
        }
    }

    /// The logical size SQLite sees for a physical size: the end of the
    /// last complete unit (a torn trailing unit does not count).
    pub fn logical_size(&self, phys: u64) -> u64 {
        match *self {
            Geometry::Pages { base, .. } => phys.saturating_sub(base),
            Geometry::Wal {
                page_size,
                base,
                ov,
            } => {
                if phys < base + wal_header_phys(ov) {
                    return 0;
                }
                // A torn trailing frame does not count.
                let whole = (phys - base - wal_header_phys(ov)) / wal_frame_phys(page_size);
                WAL_HEADER as u64 + whole * (WAL_FRAME_HEADER + page_size) as u64
            }
            Geometry::Blocks { base, block, ov } => {
                let rest = phys.saturating_sub(base);
                let pblock = (block + ov) as u64;
                let whole = rest / pblock;
                let tail = rest % pblock;
                whole * block as u64 + tail.saturating_sub(ov as u64)
            }
        }
    }

    /// The physical size to truncate to so that the logical size becomes
    /// at most `size` (units cut in the middle are dropped, except blocks,
    /// which the caller re-seals shorter).
    pub fn physical_size(&self, size: u64) -> u64 {
        match *self {
            Geometry::Pages { base, .. } => base + size,
            Geometry::Wal { base, .. } if size < WAL_HEADER as u64 => base,
            // Keep the complete units before the cut.
            Geometry::Wal { .. } => self.unit_at(size).pstart,
            Geometry::Blocks { base, block, ov } => {
                let b = block as u64;
                let whole = size / b;
                let tail = size % b;
                base + whole * (b + ov as u64) + if tail > 0 { tail + ov as u64 } else { 0 }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_map_one_to_one_after_the_header() {
        let g = Geometry::Pages {
            page_size: 4096,
            base: HEADER_LEN,
            ov: SEAL_OVERHEAD,
        };
        let u = g.unit_at(8192 + 100);
        assert_eq!(
            (u.index, u.lstart, u.pstart, u.plen()),
            (3, 8192, HEADER_LEN + 8192, 4096)
        );
        assert_eq!(g.logical_size(HEADER_LEN + 3 * 4096), 3 * 4096);
        assert_eq!(g.logical_size(10), 0);
    }

    #[test]
    fn wal_units_tile_the_file() {
        let p = 1024usize;
        let g = Geometry::Wal {
            page_size: p,
            base: HEADER_LEN,
            ov: SEAL_OVERHEAD,
        };
        let h = g.unit_at(0);
        assert_eq!(
            (h.class, h.plen(), h.pstart),
            (class::WAL_HEADER, 60, HEADER_LEN)
        );
        // Frame header and page are one unit: salts (8) + 24 + page.
        let pframe = 8 + 24 + p as u64;
        for off in [32, 32 + 10, 32 + 24, 32 + 24 + p as u64 - 1] {
            let f = g.unit_at(off);
            assert_eq!(
                (f.class, f.index, f.lstart, f.llen, f.pstart, f.plen()),
                (
                    class::WAL_FRAME,
                    0,
                    32,
                    24 + p,
                    HEADER_LEN + 60,
                    pframe as usize
                ),
                "offset {off}"
            );
            assert_eq!((f.prefix, f.appended), (8, false));
        }
        let f2 = g.unit_at(32 + 24 + p as u64);
        assert_eq!((f2.index, f2.pstart), (1, HEADER_LEN + 60 + pframe));
        assert_eq!(f2.describe(), "WAL frame 2");
        // Sizes: header + 2 frames; a torn third frame does not count.
        let two = HEADER_LEN + 60 + 2 * pframe;
        assert_eq!(g.logical_size(two), 32 + 2 * (24 + p as u64));
        assert_eq!(g.logical_size(two + pframe - 1), 32 + 2 * (24 + p as u64));
        assert_eq!(g.logical_size(two + pframe), 32 + 3 * (24 + p as u64));
        assert_eq!(g.physical_size(0), HEADER_LEN);
        assert_eq!(g.physical_size(32), HEADER_LEN + 60);
        assert_eq!(g.physical_size(32 + 2 * (24 + p as u64)), two);
        assert_eq!(g.logical_size(g.physical_size(32 + 24 + 10)), 32);
        assert_eq!(g.logical_size(g.physical_size(32 + 10)), 32);
    }

    #[test]
    fn blocks_round_trip_sizes() {
        for block in [JOURNAL_BLOCK, TEMP_BLOCK] {
            let g = Geometry::Blocks {
                base: 0,
                block,
                ov: SEAL_OVERHEAD,
            };
            for size in [0u64, 1, 4067, 4068, 4069, 4095, 4096, 4097, 3 * 4096 + 17] {
                assert_eq!(
                    g.logical_size(g.physical_size(size)),
                    size,
                    "{block} {size}"
                );
            }
            let u = g.unit_at(block as u64 * 2 + 5);
            assert_eq!((u.index, u.pstart), (2, 2 * (block + SEAL_OVERHEAD) as u64));
        }
        // Journal blocks sit on 4 KiB boundaries after the 8 KiB header.
        for ov in [SEAL_OVERHEAD, SEAL_OVERHEAD + atrest_crypto::INFRA_OVERHEAD] {
            let g = Geometry::Blocks {
                base: HEADER_LEN,
                block: journal_block(ov),
                ov,
            };
            for k in 0..5 {
                let u = g.unit_at(k * journal_block(ov) as u64);
                assert_eq!(u.pstart % 4096, 0);
                assert_eq!(u.plen(), 4096);
            }
        }
    }

    #[test]
    fn wal_units_tile_the_file_with_both_layers() {
        let ov = SEAL_OVERHEAD + atrest_crypto::INFRA_OVERHEAD;
        let p = 4096usize;
        let g = Geometry::Wal {
            page_size: p,
            base: HEADER_LEN,
            ov,
        };
        assert_eq!(ov, 76, "28 (AES-256-GCM) + 48 (AEGIS-256)");
        let hdr = 32 + ov as u64;
        assert_eq!(g.unit_at(0).plen(), 32 + ov);
        // The frame unit does not grow with the layers: both trailers sit
        // in the page's reserved bytes.
        let f = g.unit_at(32 + 24);
        assert_eq!((f.pstart, f.plen()), (HEADER_LEN + hdr, 8 + 24 + p));
        let two = HEADER_LEN + hdr + 2 * (8 + 24 + p as u64);
        assert_eq!(g.logical_size(two), 32 + 2 * (24 + p as u64));
        assert_eq!(g.physical_size(32 + 2 * (24 + p as u64)), two);
    }
}
