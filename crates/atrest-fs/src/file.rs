//! One sealed file: plaintext reads and writes at any offset, translated
//! to authenticated units in the ciphertext file beneath.
//!
//! See `layout.rs` for where units sit and docs/CRYPTO.md ("atrest-fs")
//! for why a crash at any moment leaves every file readable:
//!
//! * **Two-slot files** (everything but relation data): a unit written
//!   after a sync goes to the slot *not* holding its last synced version;
//!   further writes before the next sync overwrite that same slot. A torn
//!   write therefore only ever damages a version that no sync covered, and
//!   the other slot still holds the last synced one.
//! * **Sequence maps.** After each sync, every unit that became durable
//!   has its sequence number recorded in its group's map (itself two
//!   slots, written after the data sync and so durable by the next one).
//!   A read must find a valid slot at least as new as the map says: a
//!   damaged or replayed newest version is an error, never an older answer.
//! * **One-slot files** (relation data, whose torn pages PostgreSQL
//!   restores from the full-page images in its WAL): a damaged unit is an
//!   error; a torn unit past the last synced length is a cut-off append.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, RwLock};

use atrest_crypto::{
    Dek, FileHeader, FileId, FileKind, FsLayout, InfraUnitKey, KeySource, SealContext, UnitKey,
    WrappedDek, HEADER_SLOT_SIZE, INFRA_OVERHEAD, SEAL_OVERHEAD,
};
use zeroize::Zeroize;

use crate::keys::{file_header, RootKey};
use crate::layout::{Layout, GROUP_UNITS, META, UNIT};
use crate::FsError;

const CLASS_DATA: u16 = 10;
const CLASS_MAP: u16 = 11;
/// Seals reserved in the header at a time (see CRYPTO.md, usage limit).
const RESERVE: u64 = 1 << 16;
/// A file's sequence maps are written at most this often (and always at
/// close): a map is for detecting a damaged or replayed version, not for
/// crash safety, and writing it at every sync doubled the I/O of a commit.
const MAP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What a slot's clear metadata says. Trusted only after the seal opens
/// (both values are bound as associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    seq: u64,
    len: usize,
}

fn meta_of(slot: &[u8]) -> Option<Meta> {
    let seq = u64::from_be_bytes(slot[0..8].try_into().unwrap());
    let len = u32::from_be_bytes(slot[8..12].try_into().unwrap()) as usize;
    let zero = u32::from_be_bytes(slot[12..16].try_into().unwrap());
    (seq != 0 && len <= UNIT && zero == 0).then_some(Meta { seq, len })
}

#[derive(Debug, Clone, Copy)]
struct UnitState {
    /// The slot holding the newest version written.
    slot: u8,
    seq: u64,
    /// Written since the last sync: the next write overwrites this slot.
    dirty: bool,
}

struct GroupMap {
    seqs: Vec<u64>,
    /// The map slot holding the newest map (None: never written).
    slot: Option<u8>,
}

struct State {
    header: FileHeader,
    /// The header slot written last, and whether a sync has covered it.
    header_slot: u8,
    header_synced: bool,
    size: u64,
    next_seq: u64,
    /// Two-slot files: what this process knows of each unit's slots.
    units: HashMap<u64, UnitState>,
    maps: HashMap<u64, GroupMap>,
    /// Groups whose map has been written (count from group 0).
    maps_written: u64,
    /// Groups whose map changed in memory but is not written yet.
    maps_pending: std::collections::BTreeSet<u64>,
    maps_flushed_at: Option<std::time::Instant>,
    /// A DEK rotation copying this file: the units written since it began
    /// (copied again before the switch).
    rotating: Option<std::collections::BTreeSet<u64>>,
}

impl State {
    fn layout_fields(&mut self) -> &mut FsLayout {
        self.header.fs.as_mut().expect("fs header")
    }
}

/// One ciphertext file's keys and state (what a DEK rotation replaces).
struct Sealed {
    file: File,
    name: Mutex<String>,
    layout: Layout,
    file_id: FileId,
    dek: Dek,
    key: UnitKey,
    /// The infrastructure layer's unit key (scenario 2).
    infra: Option<InfraUnitKey>,
    st: Mutex<State>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("name", &self.name())
            .field("slots", &self.layout.slots)
            .finish_non_exhaustive()
    }
}

fn io(what: &str, name: &str, e: std::io::Error) -> FsError {
    FsError::io(format!("{what} {name}"), e)
}

impl Sealed {
    /// Writes a new, empty sealed file into `file` (freshly created, empty).
    fn create(file: File, name: &str, root: &RootKey, slots: u8) -> Result<Sealed, FsError> {
        let file_id = FileId::random()?;
        let (dek, source, infra) = root.new_file_key(file_id)?;
        let (infra, record) = match infra {
            Some((idek, r)) => (Some(InfraUnitKey::new(&idek, r.unit_cipher)?), Some(r)),
            None => (None, None),
        };
        let header = file_header(file_id, &dek, source, slots, record);
        let slot = header.encode(&dek)?;
        file.write_all_at(&slot, 0)
            .and_then(|_| file.set_len(crate::layout::HEADER_LEN))
            .map_err(|e| io("write header of", name, e))?;
        let key = UnitKey::new(&dek, 0)?;
        Ok(Sealed {
            file,
            name: Mutex::new(name.to_string()),
            layout: Layout {
                slots,
                infra: infra.is_some(),
            },
            file_id,
            dek,
            key,
            infra,
            st: Mutex::new(State {
                header,
                header_slot: 0,
                header_synced: false,
                size: 0,
                next_seq: 1,
                units: HashMap::new(),
                maps: HashMap::new(),
                maps_written: 0,
                maps_pending: Default::default(),
                maps_flushed_at: None,
                rotating: None,
            }),
        })
    }

    /// Opens an existing sealed file.
    fn open(file: File, name: &str, root: &RootKey) -> Result<Sealed, FsError> {
        let (header, dek, header_slot) = best_header(&file, name, root)?;
        let fs = header
            .fs
            .ok_or_else(|| FsError::Header(format!("{name}: no fs layout")))?;
        let infra = match root.file_infra(header.file_id, header.infra.as_ref()) {
            Ok(Some(idek)) => Some(InfraUnitKey::new(
                &idek,
                header.infra.as_ref().expect("checked").unit_cipher,
            )?),
            Ok(None) => None,
            Err(e) => {
                return Err(FsError::Tampered {
                    file: name.to_string(),
                    what: e.to_string(),
                })
            }
        };
        let layout = Layout {
            slots: fs.slots,
            infra: infra.is_some(),
        };
        // Every seal counted so far is below the reservation; start above it.
        let next_seq = header.seals_reserved.max(1);
        let key = UnitKey::new(&dek, header.seals_reserved)?;
        let physical = file.metadata().map_err(|e| io("stat", name, e))?.len();
        let cf = Sealed {
            file,
            name: Mutex::new(name.to_string()),
            layout,
            file_id: header.file_id,
            dek,
            key,
            infra,
            st: Mutex::new(State {
                maps_written: fs.map_groups,
                header,
                header_slot,
                header_synced: true,
                size: 0,
                next_seq,
                units: HashMap::new(),
                maps: HashMap::new(),
                maps_pending: Default::default(),
                maps_flushed_at: None,
                rotating: None,
            }),
        };
        let mut units = layout.units_in(physical);
        if units < fs.durable_units {
            return Err(FsError::Tampered {
                file: name.to_string(),
                what: format!(
                    "it holds {units} units but {} were synced: it was cut short",
                    fs.durable_units
                ),
            });
        }
        let mut st = cf.st.lock().unwrap();
        let mut buf = vec![0u8; layout.slot() * 2];
        while units > 0 {
            let i = units - 1;
            match cf.read_unit(&mut st, i, &mut buf, None) {
                Ok(len) => {
                    st.size = i * UNIT as u64 + len as u64;
                    break;
                }
                // A unit no sync covered, cut by a crash while the file grew:
                // the append never happened.
                Err(_) if i >= fs.durable_units => {
                    tracing::warn!(
                        file = name,
                        unit = i,
                        "dropping a torn unit past the synced length"
                    );
                    units -= 1;
                }
                Err(e) => return Err(e),
            }
        }
        buf.zeroize();
        drop(st);
        Ok(cf)
    }

    pub fn name(&self) -> String {
        self.name.lock().unwrap().clone()
    }

    pub fn set_name(&self, name: &str) {
        *self.name.lock().unwrap() = name.to_string();
    }

    /// The plaintext length.
    pub fn size(&self) -> u64 {
        self.st.lock().unwrap().size
    }

    pub fn slots(&self) -> u8 {
        self.layout.slots
    }

    /// Seals counted under this file's DEK (for the usage limit).
    pub fn sealed_count(&self) -> u64 {
        self.key.sealed_count()
    }

    fn ctx(&self, class: u16, index: u64, seq: u64) -> SealContext {
        SealContext {
            file_id: self.file_id,
            kind: FileKind::FsFile,
            class,
            index,
            generation: seq,
        }
    }

    fn tampered(&self, unit: u64, what: impl Into<String>) -> FsError {
        let e = FsError::Tampered {
            file: self.name(),
            what: format!("unit {unit} {}", what.into()),
        };
        tracing::error!("{e}");
        e
    }

    /// Opens the slot in `slot` (META + sealed) in place; returns its meta.
    /// Opens a slot in place (the infrastructure layer first, then the
    /// data layer); the plaintext is left at `slot[META..META+len]`.
    fn open_slot(&self, class: u16, index: u64, slot: &mut [u8]) -> Option<Meta> {
        let m = meta_of(slot)?;
        let ctx = self.ctx(class, index, m.seq);
        if let Some(infra) = &self.infra {
            infra
                .open(
                    &ctx,
                    &mut slot[META..META + m.len + SEAL_OVERHEAD + INFRA_OVERHEAD],
                )
                .ok()?;
        }
        let sealed = &mut slot[META..META + m.len + SEAL_OVERHEAD];
        self.key.open(&ctx, sealed).ok().map(|_| m)
    }

    /// The sequence the map requires of unit `i` (0 when none).
    fn required_seq(&self, st: &mut State, i: u64) -> Result<u64, FsError> {
        if self.layout.slots == 1 {
            return Ok(0);
        }
        let g = i / GROUP_UNITS;
        self.load_map(st, g)?;
        Ok(st.maps[&g].seqs[(i % GROUP_UNITS) as usize])
    }

    fn load_map(&self, st: &mut State, g: u64) -> Result<(), FsError> {
        if st.maps.contains_key(&g) {
            return Ok(());
        }
        let mut buf = vec![0u8; 2 * self.layout.slot()];
        let off = self.layout.map_offset(g, 0);
        let n = read_full_at(&self.file, &mut buf, off).map_err(|e| io("read", &self.name(), e))?;
        let mut best: Option<(u64, u8, Vec<u64>)> = None;
        for k in 0..2u8 {
            let s =
                &mut buf[k as usize * self.layout.slot()..(k as usize + 1) * self.layout.slot()];
            if n < (k as usize + 1) * self.layout.slot() {
                continue;
            }
            if let Some(m) = self.open_slot(CLASS_MAP, g, s) {
                if m.len == UNIT && best.as_ref().is_none_or(|b| m.seq > b.0) {
                    let seqs = s[META..META + UNIT]
                        .chunks_exact(8)
                        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                        .collect();
                    best = Some((m.seq, k, seqs));
                }
            }
        }
        let map = match best {
            Some((_, k, seqs)) => {
                st.maps_written = st.maps_written.max(g + 1);
                GroupMap {
                    seqs,
                    slot: Some(k),
                }
            }
            None if g < st.header.fs.unwrap().map_groups => {
                return Err(self.tampered(
                    g * GROUP_UNITS,
                    format!("onwards: the sequence map of group {g} failed authentication"),
                ))
            }
            None => GroupMap {
                seqs: vec![0; GROUP_UNITS as usize],
                slot: None,
            },
        };
        st.maps.insert(g, map);
        Ok(())
    }

    /// Reads and opens unit `i` into `buf[..SLOT*slots]`; the plaintext is
    /// left at `buf[META..META+len]` of the chosen slot, copied to `out`
    /// when given. Returns the unit's length.
    fn read_unit(
        &self,
        st: &mut State,
        i: u64,
        buf: &mut [u8],
        out: Option<&mut [u8]>,
    ) -> Result<usize, FsError> {
        let slots = self.layout.slots as usize;
        let off = self.layout.slot_offset(i, 0);
        let n = read_full_at(&self.file, &mut buf[..slots * self.layout.slot()], off)
            .map_err(|e| io("read", &self.name(), e))?;
        if n < self.layout.slot() {
            return Err(self.tampered(i, "is missing (the file was cut short)"));
        }
        let required = self.required_seq(st, i)?;
        // Newest first by the clear sequence; the seal decides.
        let mut order: Vec<(u64, usize)> = (0..slots)
            .filter(|k| n >= (k + 1) * self.layout.slot())
            .filter_map(|k| meta_of(&buf[k * self.layout.slot()..]).map(|m| (m.seq, k)))
            .collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        for (_, k) in order {
            let s = &mut buf[k * self.layout.slot()..(k + 1) * self.layout.slot()];
            if let Some(m) = self.open_slot(CLASS_DATA, i, s) {
                if m.seq < required {
                    return Err(self.tampered(
                        i,
                        format!(
                            "is older than its last synced version (sequence {} < {required}): replayed or damaged",
                            m.seq
                        ),
                    ));
                }
                if slots == 2 {
                    st.units.entry(i).or_insert(UnitState {
                        slot: k as u8,
                        seq: m.seq,
                        dirty: false,
                    });
                }
                if let Some(out) = out {
                    out[..m.len].copy_from_slice(&s[META..META + m.len]);
                }
                return Ok(m.len);
            }
        }
        Err(self.tampered(i, "failed authentication"))
    }

    /// Reads up to `out.len()` bytes at `off`; returns how many (short at
    /// the end of the file).
    pub fn read_at(&self, off: u64, out: &mut [u8]) -> Result<usize, FsError> {
        let mut st = self.st.lock().unwrap();
        let size = st.size;
        if off >= size {
            return Ok(0);
        }
        let len = out.len().min((size - off) as usize);
        let first = off / UNIT as u64;
        let last = (off + len as u64 - 1) / UNIT as u64;
        let mut buf = vec![0u8; self.layout.slot() * self.layout.slots as usize];
        let mut plain = vec![0u8; UNIT];
        let mut done = 0usize;
        for i in first..=last {
            let ulen = self.read_unit(&mut st, i, &mut buf, Some(&mut plain))?;
            let expect = (size - i * UNIT as u64).min(UNIT as u64) as usize;
            if ulen != expect {
                return Err(self.tampered(
                    i,
                    format!("holds {ulen} bytes where the file's length needs {expect}"),
                ));
            }
            let ustart = i * UNIT as u64;
            let from = (off.max(ustart) - ustart) as usize;
            let to = ((off + len as u64).min(ustart + UNIT as u64) - ustart) as usize;
            out[done..done + (to - from)].copy_from_slice(&plain[from..to]);
            done += to - from;
        }
        buf.zeroize();
        plain.zeroize();
        Ok(done)
    }

    fn take_seq(&self, st: &mut State) -> Result<u64, FsError> {
        if st.next_seq >= st.header.seals_reserved {
            st.header.seals_reserved = st.next_seq + RESERVE;
            self.write_header(st)?;
            self.file
                .sync_data()
                .map_err(|e| io("sync", &self.name(), e))?;
            st.header_synced = true;
        }
        let s = st.next_seq;
        st.next_seq += 1;
        Ok(s)
    }

    /// Writes the header into the slot a crash cannot take the last synced
    /// header from.
    fn write_header(&self, st: &mut State) -> Result<(), FsError> {
        let target = if st.header_synced {
            1 - st.header_slot
        } else {
            st.header_slot
        };
        st.header.sequence += 1;
        let slot = st.header.encode(&self.dek)?;
        self.file
            .write_all_at(&slot, target as u64 * HEADER_SLOT_SIZE as u64)
            .map_err(|e| io("write header of", &self.name(), e))?;
        st.header_slot = target;
        st.header_synced = false;
        Ok(())
    }

    /// Seals `plain` as a slot of `class`/`index` into `slot` (one slot's
    /// bytes): the data layer, then the infrastructure layer over it.
    fn seal_slot(
        &self,
        class: u16,
        index: u64,
        seq: u64,
        plain: &[u8],
        slot: &mut [u8],
    ) -> Result<(), FsError> {
        let len = plain.len();
        slot[0..8].copy_from_slice(&seq.to_be_bytes());
        slot[8..12].copy_from_slice(&(len as u32).to_be_bytes());
        slot[12..16].fill(0);
        slot[META..META + len].copy_from_slice(plain);
        slot[META + len..].fill(0);
        let ctx = self.ctx(class, index, seq);
        self.key
            .seal(&ctx, &mut slot[META..META + len + SEAL_OVERHEAD])?;
        if let Some(infra) = &self.infra {
            infra.seal(
                &ctx,
                &mut slot[META..META + len + SEAL_OVERHEAD + INFRA_OVERHEAD],
            )?;
        }
        Ok(())
    }

    /// The slot unit `i`'s next write goes to (two-slot files).
    fn target_slot(&self, st: &mut State, i: u64) -> Result<u8, FsError> {
        if let Some(u) = st.units.get(&i) {
            return Ok(if u.dirty { u.slot } else { 1 - u.slot });
        }
        // Not seen by this process: the slot with the newer sequence holds
        // the version to keep. (Only the clear metadata is read.)
        let mut m = [0u8; META];
        let mut best: Option<(u64, u8)> = None;
        for k in 0..2u8 {
            let n = read_full_at(&self.file, &mut m, self.layout.slot_offset(i, k))
                .map_err(|e| io("read", &self.name(), e))?;
            if n == META {
                if let Some(meta) = meta_of(&m) {
                    if best.is_none_or(|b| meta.seq > b.0) {
                        best = Some((meta.seq, k));
                    }
                }
            }
        }
        Ok(match best {
            Some((_, k)) => 1 - k,
            None => 0,
        })
    }

    /// Writes `data` at `off`, growing the file (with zeros) as needed.
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<(), FsError> {
        let mut st = self.st.lock().unwrap();
        self.write_locked(&mut st, off, data)
    }

    fn write_locked(&self, st: &mut State, off: u64, data: &[u8]) -> Result<(), FsError> {
        if data.is_empty() {
            return Ok(());
        }
        let old_size = st.size;
        let end = off + data.len() as u64;
        let new_size = old_size.max(end);
        // From the old end (zero fill) or the write's start, to its end.
        let start = off.min(old_size);
        let first = start / UNIT as u64;
        let last = (end - 1) / UNIT as u64;
        let slots = self.layout.slots;
        let mut readbuf = vec![0u8; self.layout.slot() * slots as usize];
        let mut plain = vec![0u8; UNIT];
        // One-slot runs are written with one pwrite per contiguous batch.
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_start: Option<u64> = None;
        const BATCH_UNITS: u64 = 128;
        for i in first..=last {
            let ustart = i * UNIT as u64;
            let ulen = (new_size - ustart).min(UNIT as u64) as usize;
            let old_len = old_size.saturating_sub(ustart).min(UNIT as u64) as usize;
            let w_from = (off.max(ustart) - ustart) as usize;
            let w_to = (end.min(ustart + UNIT as u64) - ustart) as usize;
            let w_to = w_to.max(w_from);
            let covers_old = w_from == 0 && w_to >= old_len;
            plain[..ulen].fill(0);
            if old_len > 0 && !covers_old {
                let got = self.read_unit(st, i, &mut readbuf, Some(&mut plain))?;
                if got != old_len {
                    return Err(self.tampered(
                        i,
                        format!("holds {got} bytes where the file's length needs {old_len}"),
                    ));
                }
                plain[old_len..ulen].fill(0);
            }
            if w_to > w_from {
                let src_from = (ustart + w_from as u64 - off) as usize;
                plain[w_from..w_to].copy_from_slice(&data[src_from..src_from + (w_to - w_from)]);
            }
            let seq = self.take_seq(st)?;
            if slots == 1 {
                let at = batch.len();
                batch.resize(at + self.layout.slot(), 0);
                self.seal_slot(CLASS_DATA, i, seq, &plain[..ulen], &mut batch[at..])?;
                batch_start.get_or_insert(i);
                if (i - batch_start.unwrap() + 1) >= BATCH_UNITS || i == last {
                    let o = self.layout.slot_offset(batch_start.unwrap(), 0);
                    self.file
                        .write_all_at(&batch, o)
                        .map_err(|e| io("write", &self.name(), e))?;
                    batch.clear();
                    batch_start = None;
                }
            } else if ustart >= old_size {
                // A unit the file did not have: both slots get this
                // version, in one pwrite, so that its later rewrites land
                // on allocated blocks. A rewrite into a hole would make
                // the next fdatasync commit a block allocation as well
                // (PostgreSQL zero-fills WAL segments to avoid exactly
                // that). The copy is the same sealed bytes: no new seal.
                let s = self.layout.slot();
                let mut both = vec![0u8; 2 * s];
                self.seal_slot(CLASS_DATA, i, seq, &plain[..ulen], &mut both[..s])?;
                let (a, b) = both.split_at_mut(s);
                b.copy_from_slice(a);
                self.file
                    .write_all_at(&both, self.layout.slot_offset(i, 0))
                    .map_err(|e| io("write", &self.name(), e))?;
                both.zeroize();
                st.units.insert(
                    i,
                    UnitState {
                        slot: 0,
                        seq,
                        dirty: true,
                    },
                );
            } else {
                let k = self.target_slot(st, i)?;
                let mut slot = vec![0u8; self.layout.slot()];
                self.seal_slot(CLASS_DATA, i, seq, &plain[..ulen], &mut slot)?;
                self.file
                    .write_all_at(&slot, self.layout.slot_offset(i, k))
                    .map_err(|e| io("write", &self.name(), e))?;
                st.units.insert(
                    i,
                    UnitState {
                        slot: k,
                        seq,
                        dirty: true,
                    },
                );
            }
            if let Some(r) = &mut st.rotating {
                r.insert(i);
            }
            // Grow as units land, so a failure part-way leaves a consistent length.
            st.size = st.size.max(ustart + ulen as u64);
        }
        plain.zeroize();
        readbuf.zeroize();
        batch.zeroize();
        st.size = new_size;
        Ok(())
    }

    /// Sets the plaintext length.
    pub fn truncate(&self, new_size: u64) -> Result<(), FsError> {
        let mut st = self.st.lock().unwrap();
        let size = st.size;
        if new_size > size {
            // Zero fill, in bounded pieces.
            let zeros = vec![0u8; 64 * UNIT];
            let mut at = size;
            while at < new_size {
                let n = (new_size - at).min(zeros.len() as u64) as usize;
                self.write_locked(&mut st, at, &zeros[..n])?;
                at += n as u64;
            }
            return Ok(());
        }
        if new_size == size {
            return Ok(());
        }
        let units = new_size.div_ceil(UNIT as u64);
        let tail = (new_size % UNIT as u64) as usize;
        if tail != 0 {
            // The new last unit keeps its first `tail` bytes.
            let i = units - 1;
            let mut buf = vec![0u8; self.layout.slot() * self.layout.slots as usize];
            let mut plain = vec![0u8; UNIT];
            self.read_unit(&mut st, i, &mut buf, Some(&mut plain))?;
            st.size = new_size; // so the rewrite is sized to `tail`
            let keep = plain[..tail].to_vec();
            st.size = i * UNIT as u64;
            let r = self.write_locked(&mut st, i * UNIT as u64, &keep);
            plain.zeroize();
            buf.zeroize();
            r?;
        }
        // Record the shorter synced length before cutting, so a crash in
        // between never makes the cut look like damage.
        let fs = *st.layout_fields();
        if fs.durable_units > units {
            st.layout_fields().durable_units = units;
            self.write_header(&mut st)?;
            self.file
                .sync_data()
                .map_err(|e| io("sync", &self.name(), e))?;
            st.header_synced = true;
        }
        self.file
            .set_len(self.layout.physical_len(units))
            .map_err(|e| io("truncate", &self.name(), e))?;
        st.units.retain(|&i, _| i < units);
        st.size = new_size;
        Ok(())
    }

    /// Makes everything written so far durable (fdatasync), then records
    /// it: the units' sequences in the maps and the synced length in the
    /// header. Those records become durable with the next sync.
    pub fn sync(&self) -> Result<(), FsError> {
        self.sync_inner(false)
    }

    fn sync_inner(&self, force_maps: bool) -> Result<(), FsError> {
        let (snapshot, units_now, maps_before) = {
            let st = self.st.lock().unwrap();
            let snap: Vec<(u64, u64)> = st
                .units
                .iter()
                .filter(|(_, u)| u.dirty)
                .map(|(&i, u)| (i, u.seq))
                .collect();
            (snap, st.size.div_ceil(UNIT as u64), st.maps_written)
        };
        self.file
            .sync_data()
            .map_err(|e| io("sync", &self.name(), e))?;
        let mut st = self.st.lock().unwrap();
        st.header_synced = true;
        // Units whose newest version is now durable.
        let mut groups: BTreeMap<u64, ()> = BTreeMap::new();
        for (i, seq) in snapshot {
            let Some(u) = st.units.get_mut(&i) else {
                continue;
            };
            if u.seq == seq {
                u.dirty = false;
            }
            let g = i / GROUP_UNITS;
            self.load_map(&mut st, g)?;
            let m = st.maps.get_mut(&g).unwrap();
            let e = &mut m.seqs[(i % GROUP_UNITS) as usize];
            if *e < seq {
                *e = seq;
                groups.insert(g, ());
            }
        }
        st.maps_pending.extend(groups.into_keys());
        let due = force_maps
            || st
                .maps_flushed_at
                .is_none_or(|t| t.elapsed() >= MAP_INTERVAL);
        let to_write: Vec<u64> = if due {
            std::mem::take(&mut st.maps_pending).into_iter().collect()
        } else {
            vec![]
        };
        if due {
            st.maps_flushed_at = Some(std::time::Instant::now());
        }
        for g in to_write {
            let seq = self.take_seq(&mut st)?;
            let m = st.maps.get(&g).unwrap();
            let target = m.slot.map_or(0, |k| 1 - k);
            let mut plain = vec![0u8; UNIT];
            for (c, s) in plain.chunks_exact_mut(8).zip(&m.seqs) {
                c.copy_from_slice(&s.to_be_bytes());
            }
            let mut slot = vec![0u8; self.layout.slot()];
            self.seal_slot(CLASS_MAP, g, seq, &plain, &mut slot)?;
            self.file
                .write_all_at(&slot, self.layout.map_offset(g, target))
                .map_err(|e| io("write", &self.name(), e))?;
            st.maps.get_mut(&g).unwrap().slot = Some(target);
            st.maps_written = st.maps_written.max(g + 1);
        }
        let fs = *st.layout_fields();
        let durable = units_now.min(st.size.div_ceil(UNIT as u64));
        if fs.durable_units != durable || fs.map_groups < maps_before {
            let f = st.layout_fields();
            f.durable_units = durable;
            f.map_groups = f.map_groups.max(maps_before);
            self.write_header(&mut st)?;
        }
        Ok(())
    }

    /// Replaces the header's copy of the root's KEK-wrapped DEK (a key
    /// change), durably; only the header changes. `false`: it had it.
    pub fn rewrap_parent(&self, wrapped: &WrappedDek) -> Result<bool, FsError> {
        let mut st = self.st.lock().unwrap();
        match &mut st.header.key_source {
            KeySource::Parent { parent_wrapped, .. } if parent_wrapped == wrapped => {
                // The newest slot has it; the other may not (a rewrap cut
                // between the two slots): then that slot is rewritten.
                if !self.other_slot_differs(&st, wrapped) {
                    return Ok(false);
                }
                if !st.header_synced {
                    self.file
                        .sync_data()
                        .map_err(|e| io("sync", &self.name(), e))?;
                    st.header_synced = true;
                }
                self.write_header(&mut st)?;
                self.file
                    .sync_data()
                    .map_err(|e| io("sync", &self.name(), e))?;
                st.header_synced = true;
                return Ok(true);
            }
            KeySource::Parent { parent_wrapped, .. } => *parent_wrapped = wrapped.clone(),
            _ => {
                return Err(FsError::Header(format!(
                    "{}: a file's DEK must be wrapped by its tree's root key",
                    self.name()
                )))
            }
        }
        // Both slots, each synced: no copy under the old KEK is left.
        for _ in 0..2 {
            self.write_header(&mut st)?;
            self.file
                .sync_data()
                .map_err(|e| io("sync", &self.name(), e))?;
            st.header_synced = true;
        }
        Ok(true)
    }

    /// Whether the header slot not holding the newest header names another
    /// copy of the root's wrapping than `wrapped` (an empty slot does not;
    /// one that does not decode does, and is rewritten).
    fn other_slot_differs(&self, st: &State, wrapped: &WrappedDek) -> bool {
        let mut slot = vec![0u8; HEADER_SLOT_SIZE];
        let at = (1 - st.header_slot) as u64 * HEADER_SLOT_SIZE as u64;
        if self.file.read_exact_at(&mut slot, at).is_err() {
            return false;
        }
        match FileHeader::decode_unverified(&slot) {
            Ok(None) => false,
            Ok(Some(u)) => match &u.claims().key_source {
                KeySource::Parent { parent_wrapped, .. } => parent_wrapped != wrapped,
                _ => true,
            },
            Err(_) => true,
        }
    }

    /// Writes back the exact seal count (a clean close), so the next open
    /// starts where this one ended rather than past its reservation.
    pub fn close(&self) -> Result<(), FsError> {
        self.sync_inner(true)?;
        let mut st = self.st.lock().unwrap();
        if st.header.seals_reserved > st.next_seq {
            st.header.seals_reserved = st.next_seq;
            self.write_header(&mut st)?;
            self.file
                .sync_data()
                .map_err(|e| io("sync", &self.name(), e))?;
            st.header_synced = true;
        }
        Ok(())
    }
}

/// The newer of a file's two header slots that verifies, its DEK, and
/// the slot it is in.
fn best_header(file: &File, name: &str, root: &RootKey) -> Result<(FileHeader, Dek, u8), FsError> {
    let mut best: Option<(FileHeader, Dek, u8)> = None;
    let mut last_err: Option<FsError> = None;
    for k in 0..2u8 {
        let mut slot = vec![0u8; HEADER_SLOT_SIZE];
        if file
            .read_exact_at(&mut slot, k as u64 * HEADER_SLOT_SIZE as u64)
            .is_err()
        {
            continue;
        }
        let u = match FileHeader::decode_unverified(&slot) {
            Ok(Some(u)) => u,
            Ok(None) => continue,
            Err(e) => {
                last_err = Some(FsError::Crypto(e));
                continue;
            }
        };
        let c = u.claims();
        if c.kind != FileKind::FsFile {
            last_err = Some(FsError::Header(format!("{name} is not an atrest-fs file")));
            continue;
        }
        let dek = match root.file_dek(c.file_id, c.dek_id, &c.key_source) {
            Ok(d) => d,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        match u.verify(&dek) {
            Ok(h) if best.as_ref().is_none_or(|b| h.sequence > b.0.sequence) => {
                best = Some((h, dek, k))
            }
            Ok(_) => {}
            Err(e) => last_err = Some(FsError::Crypto(e)),
        }
    }
    let Some((header, dek, header_slot)) = best else {
        return Err(match last_err {
            Some(FsError::ForeignFile) => FsError::Tampered {
                file: name.to_string(),
                what: "its header names another tree's root key (copied here from another server?)"
                    .into(),
            },
            Some(e) => FsError::Tampered {
                file: name.to_string(),
                what: format!("no valid header ({e})"),
            },
            None => FsError::Tampered {
                file: name.to_string(),
                what: "no header".into(),
            },
        });
    };
    Ok((header, dek, header_slot))
}

/// A sealed file's header (the newer valid slot), read without opening
/// the file's units.
pub fn header_of(file: &File, name: &str, root: &RootKey) -> Result<FileHeader, FsError> {
    best_header(file, name, root).map(|(h, _, _)| h)
}

/// An open sealed file. Shared by every handle of one inode.
///
/// Every operation holds the read side of `cur` for its whole length; the
/// switch of a DEK rotation holds the write side, so no operation spans
/// the old ciphertext file and the new one.
pub struct CryptFile {
    cur: RwLock<Sealed>,
}

impl std::fmt::Debug for CryptFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptFile")
            .field("name", &self.name())
            .field("slots", &self.slots())
            .finish_non_exhaustive()
    }
}

/// A DEK rotation of one file under way: the new ciphertext file (new
/// DEKs in both layers) and how far the copy has come.
pub struct Rekey {
    new: Sealed,
    next: u64,
}

impl CryptFile {
    /// Writes a new, empty sealed file into `file` (freshly created, empty).
    pub fn create(file: File, name: &str, root: &RootKey, slots: u8) -> Result<CryptFile, FsError> {
        Ok(CryptFile {
            cur: RwLock::new(Sealed::create(file, name, root, slots)?),
        })
    }

    /// Opens an existing sealed file.
    pub fn open(file: File, name: &str, root: &RootKey) -> Result<CryptFile, FsError> {
        Ok(CryptFile {
            cur: RwLock::new(Sealed::open(file, name, root)?),
        })
    }

    fn s(&self) -> std::sync::RwLockReadGuard<'_, Sealed> {
        self.cur
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn name(&self) -> String {
        self.s().name()
    }

    pub fn set_name(&self, name: &str) {
        self.s().set_name(name)
    }

    /// The plaintext length.
    pub fn size(&self) -> u64 {
        self.s().size()
    }

    pub fn slots(&self) -> u8 {
        self.s().slots()
    }

    /// Seals counted under this file's DEK (for the usage limit).
    pub fn sealed_count(&self) -> u64 {
        self.s().sealed_count()
    }

    /// When this file's DEK was made (its header's creation time).
    pub fn dek_created_unix(&self) -> u64 {
        self.s().st.lock().unwrap().header.created_unix
    }

    /// Reads up to `out.len()` bytes at `off`; returns how many (short at
    /// the end of the file).
    pub fn read_at(&self, off: u64, out: &mut [u8]) -> Result<usize, FsError> {
        self.s().read_at(off, out)
    }

    /// Writes `data` at `off`, growing the file (with zeros) as needed.
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<(), FsError> {
        self.s().write_at(off, data)
    }

    /// Sets the plaintext length.
    pub fn truncate(&self, new_size: u64) -> Result<(), FsError> {
        self.s().truncate(new_size)
    }

    /// Makes everything written so far durable (fdatasync), then records
    /// it: the units' sequences in the maps and the synced length in the
    /// header. Those records become durable with the next sync.
    pub fn sync(&self) -> Result<(), FsError> {
        self.s().sync()
    }

    /// Replaces the header's copy of the root's KEK-wrapped DEK (a key
    /// change), durably; only the header changes. `false`: it had it.
    pub fn rewrap_parent(&self, wrapped: &WrappedDek) -> Result<bool, FsError> {
        self.s().rewrap_parent(wrapped)
    }

    /// Writes back the exact seal count (a clean close), so the next open
    /// starts where this one ended rather than past its reservation.
    pub fn close(&self) -> Result<(), FsError> {
        self.s().close()
    }

    /// Copies the ciphertext file as it is (header, wrapped DEKs, sealed
    /// units) to `dst`, synced, with every operation on this file held
    /// off meanwhile: the copy opens as the file stood at one moment.
    /// Returns the bytes copied.
    pub fn copy_ciphertext(&self, dst: &File) -> Result<u64, FsError> {
        let g = self
            .cur
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = g.name();
        let len = g.file.metadata().map_err(|e| io("stat", &name, e))?.len();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(buf.len());
            g.file
                .read_exact_at(&mut buf[..n], off)
                .map_err(|e| io("read", &name, e))?;
            dst.write_all_at(&buf[..n], off)
                .map_err(|e| io("copy", &name, e))?;
            off += n as u64;
        }
        drop(g);
        dst.sync_all()
            .map_err(|e| io("sync the copy of", &name, e))?;
        Ok(len)
    }

    /// Opens every unit (both layers): the units that authenticate.
    pub fn verify_units(&self) -> Result<u64, FsError> {
        let size = self.size();
        let mut buf = vec![0u8; 64 * UNIT];
        let mut off = 0;
        while off < size {
            let n = self.read_at(off, &mut buf)?;
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        buf.zeroize();
        Ok(size.div_ceil(UNIT as u64))
    }

    /// Begins re-sealing this file under new DEKs (both layers) into
    /// `tmp`, a new empty file beside it; from now on the units written
    /// are remembered, to be copied again at the switch.
    pub fn rekey_begin(&self, tmp: File, root: &RootKey) -> Result<Rekey, FsError> {
        let s = self.s();
        let new = Sealed::create(tmp, &s.name(), root, s.layout.slots)?;
        s.st.lock().unwrap().rotating = Some(Default::default());
        Ok(Rekey { new, next: 0 })
    }

    /// Copies up to `units` more units (read here, sealed there) while the
    /// file stays in use. Returns the units copied; 0 when all are.
    pub fn rekey_copy(&self, r: &mut Rekey, units: u64) -> Result<u64, FsError> {
        let s = self.s();
        let start = r.next * UNIT as u64;
        let size = s.size();
        if start >= size {
            return Ok(0);
        }
        let n = units.max(1).min((size - start).div_ceil(UNIT as u64));
        let mut buf = vec![0u8; n as usize * UNIT];
        let got = s.read_at(start, &mut buf)?;
        drop(s);
        let w = r.new.write_at(start, &buf[..got]);
        buf.zeroize();
        w?;
        r.next += n;
        Ok(n)
    }

    /// The switch, with every operation on this file held off: the units
    /// written since the copy began are copied again, the new file gets
    /// the root's current wrapping and is made durable, and `commit` puts
    /// it in place of the old (a rename and a directory sync). From then
    /// on every operation goes to the new file; the old DEKs are dropped
    /// with the old file. `commit` returning `false` (the file was renamed
    /// or removed meanwhile) switches nothing.
    pub fn rekey_switch(
        &self,
        r: Rekey,
        root_wrapped: &WrappedDek,
        commit: impl FnOnce() -> Result<bool, FsError>,
    ) -> Result<bool, FsError> {
        let mut g = self
            .cur
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dirty = g.st.lock().unwrap().rotating.take().unwrap_or_default();
        let size = g.size();
        r.new.set_name(&g.name());
        r.new.truncate(size)?;
        let mut plain = vec![0u8; UNIT];
        for i in dirty {
            let off = i * UNIT as u64;
            if off >= size {
                break;
            }
            let got = g.read_at(off, &mut plain)?;
            r.new.write_at(off, &plain[..got])?;
        }
        plain.zeroize();
        r.new.rewrap_parent(root_wrapped)?;
        r.new.close()?;
        r.new
            .file
            .sync_data()
            .map_err(|e| io("sync", &r.new.name(), e))?;
        if !commit()? {
            return Ok(false);
        }
        *g = r.new;
        Ok(true)
    }

    /// Gives up a rotation of this file: the old file stays as it was.
    pub fn rekey_abort(&self, r: Rekey) {
        self.s().st.lock().unwrap().rotating = None;
        drop(r);
    }
}

/// `pread` until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
