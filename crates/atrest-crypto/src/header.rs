//! The self-describing file header.
//!
//! Every persistent atrest file starts with two header slots of
//! [`HEADER_SLOT_SIZE`] bytes. Each slot holds the file's identity, cipher,
//! layout, its wrapped DEK (and for companion files the parent's wrapped DEK
//! too), usage counters, and an HMAC-SHA256 over all of it keyed from the
//! DEK. Updates alternate between the slots with a rising sequence number,
//! so a torn header write leaves the other slot intact.
//!
//! ```text
//! magic "ATRESTH1" | version u16 | body length u32 | body (TLV) | HMAC (32) | zero pad
//! ```

use aws_lc_rs::{constant_time, hmac};

use crate::{
    CipherId, CryptoError, Dek, DekId, FileId, InfraUnitCipher, KekRef, ProtectorKind,
    WrapAlgorithm, WrappedDek,
};

/// Bytes per header slot; a file has two.
pub const HEADER_SLOT_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"ATRESTH1";
/// Format 1: data layer only. Format 3: the header names an infrastructure
/// layer too, AEGIS-256 units and key wrap (older builds refuse it instead
/// of misreading its pages). Format 2 was the pre-release XChaCha20-Poly1305
/// infrastructure layer: refused with [`VERSION_XCHACHA_INFRA`]'s message.
///
/// Format 4: a WAL (either layer set, named by the `layers` field) whose
/// frames are sealed as one unit each, frame header and page together.
/// WALs of formats 1 and 3 sealed them as two units; this build refuses
/// them ([`FileHeader::decode_unverified`]) rather than misread them, and
/// builds before format 4 refuse a format-4 WAL as an unknown format.
///
/// Format 5: like format 3, but the infrastructure layer seals units with
/// AEGIS-256X2 (recorded in the `infra unit cipher` field). Format-3 files
/// keep AEGIS-256 for their whole life.
const VERSION: u16 = 1;
const VERSION_INFRA: u16 = 3;
const VERSION_WAL_FRAME_UNITS: u16 = 4;
const VERSION_INFRA_X2: u16 = 5;
/// Format 6: a database in the middle of a DEK rotation. The header names
/// the keys its pages were sealed under before (the `rotation` fields), in
/// either layer set and infrastructure unit cipher; a page opens under the
/// current or the previous keys. Builds before format 6 refuse such a
/// file instead of failing on half its pages; when the rotation finishes
/// the header returns to format 1, 3 or 5.
const VERSION_ROTATING: u16 = 6;
/// Format 7: a file of the encrypting filesystem (`atrest-fs`): its units
/// are slots with a clear sequence number and length, one or two slots per
/// unit, and the header carries the `fs` fields ([`FsLayout`]).
const VERSION_FS: u16 = 7;
/// The retired format of pre-release builds whose infrastructure layer was
/// XChaCha20-Poly1305 (40-byte unit trailer, reserve 68).
const VERSION_XCHACHA_INFRA: u16 = 2;
const MAC_LEN: usize = 32;
const PREFIX_LEN: usize = 8 + 2 + 4;

/// What an atrest file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FileKind {
    /// A database file; pages sealed in place using SQLite's reserved bytes.
    MainDb = 1,
    /// A write-ahead log.
    Wal = 2,
    /// A rollback journal.
    Journal = 3,
    /// A super-journal (multi-database commit).
    SuperJournal = 4,
    /// A temporary file (sorts, temp tables, statement journals); its key is
    /// random, held only in memory, and it has no header.
    Temp = 5,
    /// A file of the encrypting filesystem (`atrest-fs`): any file a
    /// database server writes, sealed in units of [`FsLayout`]'s slots.
    FsFile = 6,
    /// The key file at the root of an `atrest-fs` tree: a header only, whose
    /// DEK (wrapped by the KEK) wraps every file's DEK there.
    FsRoot = 7,
}

impl FileKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::MainDb,
            2 => Self::Wal,
            3 => Self::Journal,
            4 => Self::SuperJournal,
            5 => Self::Temp,
            6 => Self::FsFile,
            7 => Self::FsRoot,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::MainDb => "database",
            Self::Wal => "wal",
            Self::Journal => "rollback-journal",
            Self::SuperJournal => "super-journal",
            Self::Temp => "temp",
            Self::FsFile => "fs-file",
            Self::FsRoot => "fs-root",
        }
    }
}

/// How the file's DEK is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Wrapped directly by a KEK (database files).
    Kek(WrappedDek),
    /// Wrapped by a key derived from the parent database file's DEK
    /// (journals, WAL). The parent's KEK-wrapped DEK is copied here so the
    /// file can be read with nothing but the KEK.
    Parent {
        parent_file_id: FileId,
        parent_dek_id: DekId,
        parent_wrapped: WrappedDek,
        wrapped: Vec<u8>,
    },
}

impl KeySource {
    /// The KEK at the root of this file's key chain.
    pub fn root_kek(&self) -> &KekRef {
        match self {
            Self::Kek(w) => &w.kek,
            Self::Parent { parent_wrapped, .. } => &parent_wrapped.kek,
        }
    }
}

/// Which encryption layers protect a file's units. Recorded in the header
/// (and so covered by its MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layers {
    /// The data layer (AES-256-GCM under the file's DEK): always on.
    pub data: bool,
    /// The infrastructure layer (AEGIS-256 under the file's
    /// infrastructure DEK).
    pub infrastructure: bool,
}

impl Layers {
    pub const DATA_ONLY: Layers = Layers {
        data: true,
        infrastructure: false,
    };
    pub const DATA_AND_INFRA: Layers = Layers {
        data: true,
        infrastructure: true,
    };
    fn bits(self) -> u8 {
        u8::from(self.data) | (u8::from(self.infrastructure) << 1)
    }
    fn from_bits(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::DATA_ONLY),
            3 => Some(Self::DATA_AND_INFRA),
            _ => None,
        }
    }
    /// Names for `atrest inspect`: `["data"]` or `["data", "infrastructure"]`.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = vec![];
        if self.data {
            v.push("data");
        }
        if self.infrastructure {
            v.push("infrastructure");
        }
        v
    }
}

/// A file's infrastructure-layer key, as stored in its header: wrapped
/// (AEGIS-256) under an infrastructure master key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfraKeyRecord {
    pub dek_id: DekId,
    pub wrapped: WrappedDek,
    /// The AEAD of the file's units in this layer (format 3: AEGIS-256).
    pub unit_cipher: InfraUnitCipher,
}

/// A database whose DEKs are being replaced: its pages are sealed under
/// the header's (new) keys or under these (old) ones until the rotation
/// has re-sealed them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The previous data-layer DEK, wrapped like the current one.
    pub previous_dek_id: DekId,
    pub previous_wrapped: WrappedDek,
    /// The previous infrastructure DEK (same unit cipher as the current).
    pub previous_infra: Option<InfraKeyRecord>,
    /// Pages 1 to this one are known to be sealed under the current keys,
    /// and durable so.
    pub watermark: u64,
    pub started_unix: u64,
}

/// The layout fields of an `atrest-fs` file (header format 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsLayout {
    /// Physical slots per unit: 1 (a write replaces the unit in place) or 2
    /// (a write goes to the slot not holding the last synced version, so a
    /// torn write leaves that version readable).
    pub slots: u8,
    /// Units known to be on disk and synced: a file found shorter was cut.
    pub durable_units: u64,
    /// Two-slot files: groups whose sequence map is known to be synced; a
    /// group below this count with no valid map is damage, not a new group.
    pub map_groups: u64,
}

/// One decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    pub sequence: u64,
    pub kind: FileKind,
    pub cipher: CipherId,
    pub file_id: FileId,
    pub dek_id: DekId,
    /// Page size (database, WAL) or block size (journals), in bytes.
    pub unit_size: u32,
    pub created_unix: u64,
    pub key_source: KeySource,
    /// Seals this file's DEK may have performed, as an upper bound: a
    /// process reserves a range here before it uses it.
    pub seals_reserved: u64,
    /// WAL only: the salts of the WAL generation `wal_durable_frames` counts.
    pub wal_salts: u64,
    /// WAL only: frames known to be synced under `wal_salts`.
    pub wal_durable_frames: u64,
    /// The infrastructure layer's key, if that layer protects the file.
    pub infra: Option<InfraKeyRecord>,
    /// Database files only: a DEK rotation in progress.
    pub rotation: Option<Rotation>,
    /// `atrest-fs` files only (format 7): the unit layout.
    pub fs: Option<FsLayout>,
    /// Database files only: the file name the database was created under
    /// (`sales.db`). A database file found under another name was copied
    /// or swapped in, and is refused. Absent in files made before it.
    pub db_name: Option<String>,
}

impl FileHeader {
    /// The layers protecting this file's units.
    pub fn layers(&self) -> Layers {
        if self.infra.is_some() {
            Layers::DATA_AND_INFRA
        } else {
            Layers::DATA_ONLY
        }
    }
}

mod tag {
    pub const SEQUENCE: u16 = 1;
    pub const KIND: u16 = 2;
    pub const CIPHER: u16 = 3;
    pub const FILE_ID: u16 = 4;
    pub const DEK_ID: u16 = 5;
    pub const UNIT_SIZE: u16 = 6;
    pub const CREATED: u16 = 7;
    pub const KEK_WRAPPED: u16 = 8;
    pub const PARENT_FILE_ID: u16 = 9;
    pub const PARENT_DEK_ID: u16 = 10;
    pub const PARENT_WRAPPED: u16 = 11;
    pub const PARENT_KEY_WRAPPED: u16 = 12;
    pub const SEALS_RESERVED: u16 = 13;
    pub const WAL_SALTS: u16 = 14;
    pub const WAL_DURABLE: u16 = 15;
    pub const LAYERS: u16 = 16;
    pub const INFRA_DEK_ID: u16 = 17;
    pub const INFRA_WRAPPED: u16 = 18;
    pub const INFRA_UNIT_CIPHER: u16 = 19;
    pub const PREV_DEK_ID: u16 = 20;
    pub const PREV_WRAPPED: u16 = 21;
    pub const PREV_INFRA_DEK_ID: u16 = 22;
    pub const PREV_INFRA_WRAPPED: u16 = 23;
    pub const ROTATION_WATERMARK: u16 = 24;
    pub const ROTATION_STARTED: u16 = 25;
    pub const FS_SLOTS: u16 = 26;
    pub const FS_DURABLE_UNITS: u16 = 27;
    pub const FS_MAP_GROUPS: u16 = 28;
    pub const DB_NAME: u16 = 29;
}

impl FileHeader {
    /// Encodes the header into one slot, MACed under a key derived from `dek`.
    pub fn encode(&self, dek: &Dek) -> Result<Vec<u8>, CryptoError> {
        let mut body = Vec::with_capacity(512);
        put(&mut body, tag::SEQUENCE, &self.sequence.to_be_bytes());
        put(&mut body, tag::KIND, &[self.kind as u8]);
        put(&mut body, tag::CIPHER, &[self.cipher as u8]);
        put(&mut body, tag::FILE_ID, &self.file_id.0);
        put(&mut body, tag::DEK_ID, &self.dek_id.0);
        put(&mut body, tag::UNIT_SIZE, &self.unit_size.to_be_bytes());
        put(&mut body, tag::CREATED, &self.created_unix.to_be_bytes());
        match &self.key_source {
            KeySource::Kek(w) => put(&mut body, tag::KEK_WRAPPED, &encode_wrapped(w)),
            KeySource::Parent {
                parent_file_id,
                parent_dek_id,
                parent_wrapped,
                wrapped,
            } => {
                put(&mut body, tag::PARENT_FILE_ID, &parent_file_id.0);
                put(&mut body, tag::PARENT_DEK_ID, &parent_dek_id.0);
                put(
                    &mut body,
                    tag::PARENT_WRAPPED,
                    &encode_wrapped(parent_wrapped),
                );
                put(&mut body, tag::PARENT_KEY_WRAPPED, wrapped);
            }
        }
        put(
            &mut body,
            tag::SEALS_RESERVED,
            &self.seals_reserved.to_be_bytes(),
        );
        put(&mut body, tag::WAL_SALTS, &self.wal_salts.to_be_bytes());
        put(
            &mut body,
            tag::WAL_DURABLE,
            &self.wal_durable_frames.to_be_bytes(),
        );
        if let Some(n) = &self.db_name {
            put(&mut body, tag::DB_NAME, n.as_bytes());
        }
        if let Some(infra) = &self.infra {
            put(&mut body, tag::LAYERS, &[self.layers().bits()]);
            put(&mut body, tag::INFRA_DEK_ID, &infra.dek_id.0);
            put(
                &mut body,
                tag::INFRA_WRAPPED,
                &encode_wrapped(&infra.wrapped),
            );
            if infra.unit_cipher != InfraUnitCipher::Aegis256 {
                put(&mut body, tag::INFRA_UNIT_CIPHER, &[infra.unit_cipher.id()]);
            }
        }
        if let Some(r) = &self.rotation {
            put(&mut body, tag::PREV_DEK_ID, &r.previous_dek_id.0);
            put(
                &mut body,
                tag::PREV_WRAPPED,
                &encode_wrapped(&r.previous_wrapped),
            );
            if let Some(pi) = &r.previous_infra {
                put(&mut body, tag::PREV_INFRA_DEK_ID, &pi.dek_id.0);
                put(
                    &mut body,
                    tag::PREV_INFRA_WRAPPED,
                    &encode_wrapped(&pi.wrapped),
                );
            }
            put(
                &mut body,
                tag::ROTATION_WATERMARK,
                &r.watermark.to_be_bytes(),
            );
            put(
                &mut body,
                tag::ROTATION_STARTED,
                &r.started_unix.to_be_bytes(),
            );
        }
        if let Some(fs) = &self.fs {
            put(&mut body, tag::FS_SLOTS, &[fs.slots]);
            put(
                &mut body,
                tag::FS_DURABLE_UNITS,
                &fs.durable_units.to_be_bytes(),
            );
            put(&mut body, tag::FS_MAP_GROUPS, &fs.map_groups.to_be_bytes());
        }
        let version = self.format_version();

        if PREFIX_LEN + body.len() + MAC_LEN > HEADER_SLOT_SIZE {
            return Err(CryptoError::InvalidHeader(format!(
                "header body of {} bytes does not fit a {HEADER_SLOT_SIZE}-byte slot",
                body.len()
            )));
        }
        let mut slot = vec![0u8; HEADER_SLOT_SIZE];
        slot[..8].copy_from_slice(MAGIC);
        slot[8..10].copy_from_slice(&version.to_be_bytes());
        slot[10..14].copy_from_slice(&(body.len() as u32).to_be_bytes());
        slot[PREFIX_LEN..PREFIX_LEN + body.len()].copy_from_slice(&body);
        let signed_end = PREFIX_LEN + body.len();
        let mac = hmac::sign(&mac_key(dek)?, &slot[..signed_end]);
        slot[signed_end..signed_end + MAC_LEN].copy_from_slice(mac.as_ref());
        Ok(slot)
    }

    /// The format version [`Self::encode`] writes for this header: 4 for
    /// a WAL (one sealed unit per frame, either layer set); otherwise 1 for
    /// the data layer alone, 3 with the infrastructure layer in AEGIS-256,
    /// 5 with it in AEGIS-256X2; 6 for a database mid-rotation.
    pub fn format_version(&self) -> u16 {
        match (&self.infra, self.kind) {
            (_, FileKind::Wal) => VERSION_WAL_FRAME_UNITS,
            (_, FileKind::FsFile | FileKind::FsRoot) => VERSION_FS,
            _ if self.rotation.is_some() => VERSION_ROTATING,
            (None, _) => VERSION,
            (Some(r), _) if r.unit_cipher == InfraUnitCipher::Aegis256 => VERSION_INFRA,
            (Some(_), _) => VERSION_INFRA_X2,
        }
    }

    /// Parses a slot without checking its MAC (the DEK is not known yet).
    /// Returns `Ok(None)` for an all-zero (never written) slot.
    pub fn decode_unverified(slot: &[u8]) -> Result<Option<UnverifiedHeader>, CryptoError> {
        if slot.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if slot.len() < PREFIX_LEN + MAC_LEN || &slot[..8] != MAGIC {
            return Err(CryptoError::InvalidHeader(
                "not an atrest file (bad magic)".into(),
            ));
        }
        let version = u16::from_be_bytes([slot[8], slot[9]]);
        if version == VERSION_XCHACHA_INFRA {
            return Err(CryptoError::UnsupportedFormat(format!(
                "header format version {VERSION_XCHACHA_INFRA} is a pre-release infrastructure-layer format \
                 (XChaCha20-Poly1305, 68 reserved bytes per page) that this build no longer reads; \
                 its infrastructure layer is AEGIS-256 (format {VERSION_INFRA}, 76 reserved bytes). \
                 Recreate the server and reload the data with the build that wrote it"
            )));
        }
        if ![
            VERSION,
            VERSION_INFRA,
            VERSION_WAL_FRAME_UNITS,
            VERSION_INFRA_X2,
            VERSION_ROTATING,
            VERSION_FS,
        ]
        .contains(&version)
        {
            return Err(CryptoError::UnsupportedFormat(format!(
                "header format version {version} is not supported (this build reads \
                 {VERSION}, {VERSION_INFRA}, {VERSION_INFRA_X2} and {VERSION_ROTATING}, \
                 {VERSION_WAL_FRAME_UNITS} for WAL files and {VERSION_FS} for atrest-fs files)"
            )));
        }
        let body_len = u32::from_be_bytes(slot[10..14].try_into().unwrap()) as usize;
        if PREFIX_LEN + body_len + MAC_LEN > slot.len() {
            return Err(CryptoError::InvalidHeader(
                "header body length out of range".into(),
            ));
        }
        let signed_end = PREFIX_LEN + body_len;
        let header = parse_body(&slot[PREFIX_LEN..signed_end])?;
        if header.kind == FileKind::Wal && version != VERSION_WAL_FRAME_UNITS {
            return Err(CryptoError::UnsupportedFormat(format!(
                "this WAL has header format version {version}, whose frames are sealed as two \
                 units (frame header, page); this build seals each frame as one unit (WAL format \
                 {VERSION_WAL_FRAME_UNITS}) and does not read the older layout. Open the database \
                 once with the build that wrote the WAL, which checkpoints it into the database \
                 when the last connection closes, then with this one"
            )));
        }
        if (version == VERSION_ROTATING) != header.rotation.is_some()
            || header.rotation.is_some() && header.kind != FileKind::MainDb
        {
            return Err(CryptoError::InvalidHeader(
                "header format version does not match its rotation fields (format 6: a database mid-rotation)".into(),
            ));
        }
        let fs_kind = matches!(header.kind, FileKind::FsFile | FileKind::FsRoot);
        if fs_kind != (version == VERSION_FS) || fs_kind != header.fs.is_some() {
            return Err(CryptoError::InvalidHeader(format!(
                "header format version {VERSION_FS} and the fs layout fields are for atrest-fs files only \
                 (this one: {} file, format {version})",
                header.kind.name()
            )));
        }
        if version == VERSION_ROTATING || version == VERSION_FS {
            // Layers and unit cipher are named by the fields themselves.
        } else if version == VERSION_WAL_FRAME_UNITS {
            if header.kind != FileKind::Wal {
                return Err(CryptoError::InvalidHeader(format!(
                    "header format version {VERSION_WAL_FRAME_UNITS} is for WAL files, not a {} file",
                    header.kind.name()
                )));
            }
            if header
                .infra
                .as_ref()
                .is_some_and(|r| r.unit_cipher != InfraUnitCipher::Aegis256X2)
            {
                return Err(CryptoError::InvalidHeader(
                    "a format-4 WAL seals its infrastructure layer with AEGIS-256X2".into(),
                ));
            }
        } else if (version != VERSION) != header.infra.is_some()
            || header.infra.as_ref().is_some_and(|r| {
                (r.unit_cipher == InfraUnitCipher::Aegis256) != (version == VERSION_INFRA)
            })
        {
            return Err(CryptoError::InvalidHeader(
                "header format version does not match the layers it names".into(),
            ));
        }
        Ok(Some(UnverifiedHeader {
            header,
            signed: slot[..signed_end].to_vec(),
            mac: slot[signed_end..signed_end + MAC_LEN].to_vec(),
        }))
    }
}

/// A parsed header whose MAC has not been checked yet.
#[derive(Debug, Clone)]
pub struct UnverifiedHeader {
    header: FileHeader,
    signed: Vec<u8>,
    mac: Vec<u8>,
}

impl UnverifiedHeader {
    /// What the header claims. Only for finding the key; trust nothing else.
    pub fn claims(&self) -> &FileHeader {
        &self.header
    }

    /// Checks the MAC under the file's DEK and returns the trusted header.
    pub fn verify(self, dek: &Dek) -> Result<FileHeader, CryptoError> {
        if dek.id() != self.header.dek_id {
            return Err(CryptoError::HeaderAuthenticationFailed);
        }
        let expected = hmac::sign(&mac_key(dek)?, &self.signed);
        constant_time::verify_slices_are_equal(expected.as_ref(), &self.mac)
            .map_err(|_| CryptoError::HeaderAuthenticationFailed)?;
        Ok(self.header)
    }
}

fn mac_key(dek: &Dek) -> Result<hmac::Key, CryptoError> {
    let k = zeroize::Zeroizing::new(dek.derive(b"atrest header mac v1")?);
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &k[..]))
}

fn put(out: &mut Vec<u8>, tag: u16, value: &[u8]) {
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn encode_wrapped(w: &WrappedDek) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + w.kek.key_id.len() + w.bytes.len());
    v.push(w.kek.kind as u8);
    v.push(w.algorithm as u8);
    v.extend_from_slice(&(w.kek.key_id.len() as u16).to_be_bytes());
    v.extend_from_slice(w.kek.key_id.as_bytes());
    v.extend_from_slice(&(w.bytes.len() as u16).to_be_bytes());
    v.extend_from_slice(&w.bytes);
    v
}

fn decode_wrapped(v: &[u8]) -> Result<WrappedDek, CryptoError> {
    let bad = || CryptoError::InvalidHeader("malformed wrapped key".into());
    let mut r = Reader(v);
    let kind = ProtectorKind::from_u8(r.u8().ok_or_else(bad)?).ok_or_else(bad)?;
    let algorithm = WrapAlgorithm::from_u8(r.u8().ok_or_else(bad)?).ok_or_else(bad)?;
    let id_len = r.u16().ok_or_else(bad)? as usize;
    let key_id = String::from_utf8(r.take(id_len).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?;
    let n = r.u16().ok_or_else(bad)? as usize;
    let bytes = r.take(n).ok_or_else(bad)?.to_vec();
    if !r.0.is_empty() {
        return Err(bad());
    }
    Ok(WrappedDek {
        kek: KekRef { kind, key_id },
        algorithm,
        bytes,
    })
}

struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
}

fn parse_body(body: &[u8]) -> Result<FileHeader, CryptoError> {
    let bad = |what: &str| CryptoError::InvalidHeader(format!("malformed field {what}"));
    let mut r = Reader(body);
    let mut f: std::collections::BTreeMap<u16, &[u8]> = Default::default();
    while !r.0.is_empty() {
        let t = r.u16().ok_or_else(|| bad("tag"))?;
        let n = r.u32().ok_or_else(|| bad("length"))? as usize;
        let v = r.take(n).ok_or_else(|| bad("value"))?;
        if f.insert(t, v).is_some() {
            return Err(bad("duplicate"));
        }
    }
    let get = |t: u16, name: &str| {
        f.get(&t)
            .copied()
            .ok_or_else(|| CryptoError::InvalidHeader(format!("missing field {name}")))
    };
    let u64f = |t: u16, name: &str| -> Result<u64, CryptoError> {
        let v = get(t, name)?;
        Ok(u64::from_be_bytes(v.try_into().map_err(|_| bad(name))?))
    };
    let id16 = |t: u16, name: &str| -> Result<[u8; 16], CryptoError> {
        get(t, name)?.try_into().map_err(|_| bad(name))
    };
    let one = |t: u16, name: &str| -> Result<u8, CryptoError> {
        match get(t, name)? {
            [b] => Ok(*b),
            _ => Err(bad(name)),
        }
    };
    let kind = FileKind::from_u8(one(tag::KIND, "kind")?).ok_or_else(|| bad("kind"))?;
    let cipher = CipherId::from_u8(one(tag::CIPHER, "cipher")?).ok_or_else(|| {
        CryptoError::InvalidHeader("unknown cipher id (file made by a newer atrest?)".into())
    })?;
    let unit_size = u32::from_be_bytes(
        get(tag::UNIT_SIZE, "unit size")?
            .try_into()
            .map_err(|_| bad("unit size"))?,
    );
    let key_source = if let Some(w) = f.get(&tag::KEK_WRAPPED) {
        KeySource::Kek(decode_wrapped(w)?)
    } else {
        KeySource::Parent {
            parent_file_id: FileId(id16(tag::PARENT_FILE_ID, "parent file id")?),
            parent_dek_id: DekId(id16(tag::PARENT_DEK_ID, "parent dek id")?),
            parent_wrapped: decode_wrapped(get(tag::PARENT_WRAPPED, "parent wrapped key")?)?,
            wrapped: get(tag::PARENT_KEY_WRAPPED, "wrapped key")?.to_vec(),
        }
    };
    let layers = match f.get(&tag::LAYERS) {
        None => Layers::DATA_ONLY,
        Some([b]) => Layers::from_bits(*b).ok_or_else(|| bad("layers"))?,
        Some(_) => return Err(bad("layers")),
    };
    let infra = if layers.infrastructure {
        let w = decode_wrapped(get(tag::INFRA_WRAPPED, "infrastructure wrapped key")?)?;
        if w.kek.kind != ProtectorKind::Infrastructure || w.algorithm != WrapAlgorithm::Aegis256 {
            return Err(bad("infrastructure wrapped key"));
        }
        let unit_cipher = match f.get(&tag::INFRA_UNIT_CIPHER) {
            None => InfraUnitCipher::Aegis256,
            Some([id]) => InfraUnitCipher::from_id(*id)
                .filter(|c| *c != InfraUnitCipher::Aegis256)
                .ok_or_else(|| bad("infrastructure unit cipher"))?,
            Some(_) => return Err(bad("infrastructure unit cipher")),
        };
        Some(InfraKeyRecord {
            dek_id: DekId(id16(tag::INFRA_DEK_ID, "infrastructure dek id")?),
            wrapped: w,
            unit_cipher,
        })
    } else if f.contains_key(&tag::INFRA_WRAPPED)
        || f.contains_key(&tag::INFRA_DEK_ID)
        || f.contains_key(&tag::INFRA_UNIT_CIPHER)
    {
        return Err(bad("layers"));
    } else {
        None
    };
    let rotation = match f.get(&tag::PREV_DEK_ID) {
        None => {
            if [
                tag::PREV_WRAPPED,
                tag::PREV_INFRA_DEK_ID,
                tag::PREV_INFRA_WRAPPED,
                tag::ROTATION_WATERMARK,
                tag::ROTATION_STARTED,
            ]
            .iter()
            .any(|t| f.contains_key(t))
            {
                return Err(bad("rotation"));
            }
            None
        }
        Some(_) => {
            let previous_infra = match (&infra, f.get(&tag::PREV_INFRA_WRAPPED)) {
                (Some(cur), Some(w)) => {
                    let w = decode_wrapped(w)?;
                    if w.kek.kind != ProtectorKind::Infrastructure
                        || w.algorithm != WrapAlgorithm::Aegis256
                    {
                        return Err(bad("previous infrastructure wrapped key"));
                    }
                    Some(InfraKeyRecord {
                        dek_id: DekId(id16(
                            tag::PREV_INFRA_DEK_ID,
                            "previous infrastructure dek id",
                        )?),
                        wrapped: w,
                        unit_cipher: cur.unit_cipher,
                    })
                }
                (None, None) => None,
                _ => return Err(bad("previous infrastructure wrapped key")),
            };
            Some(Rotation {
                previous_dek_id: DekId(id16(tag::PREV_DEK_ID, "previous dek id")?),
                previous_wrapped: decode_wrapped(get(tag::PREV_WRAPPED, "previous wrapped key")?)?,
                previous_infra,
                watermark: u64f(tag::ROTATION_WATERMARK, "rotation watermark")?,
                started_unix: u64f(tag::ROTATION_STARTED, "rotation started")?,
            })
        }
    };
    let fs = match f.get(&tag::FS_SLOTS) {
        None => {
            if f.contains_key(&tag::FS_DURABLE_UNITS) || f.contains_key(&tag::FS_MAP_GROUPS) {
                return Err(bad("fs layout"));
            }
            None
        }
        Some([slots @ (1 | 2)]) => Some(FsLayout {
            slots: *slots,
            durable_units: u64f(tag::FS_DURABLE_UNITS, "fs durable units")?,
            map_groups: u64f(tag::FS_MAP_GROUPS, "fs map groups")?,
        }),
        Some(_) => return Err(bad("fs slots")),
    };
    let db_name = match f.get(&tag::DB_NAME) {
        None => None,
        Some(_) if kind != FileKind::MainDb => return Err(bad("database name")),
        Some(v) => match std::str::from_utf8(v) {
            Ok(n) if (1..=255).contains(&n.len()) && !n.contains('/') => Some(n.to_string()),
            _ => return Err(bad("database name")),
        },
    };
    Ok(FileHeader {
        infra,
        rotation,
        fs,
        db_name,
        sequence: u64f(tag::SEQUENCE, "sequence")?,
        kind,
        cipher,
        file_id: FileId(id16(tag::FILE_ID, "file id")?),
        dek_id: DekId(id16(tag::DEK_ID, "dek id")?),
        unit_size,
        created_unix: u64f(tag::CREATED, "created")?,
        key_source,
        seals_reserved: u64f(tag::SEALS_RESERVED, "seals reserved")?,
        wal_salts: u64f(tag::WAL_SALTS, "wal salts")?,
        wal_durable_frames: u64f(tag::WAL_DURABLE, "wal durable frames")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dek: &Dek) -> FileHeader {
        FileHeader {
            sequence: 3,
            kind: FileKind::MainDb,
            cipher: CipherId::Aes256GcmRandomNonce,
            file_id: FileId([9; 16]),
            dek_id: dek.id(),
            unit_size: 4096,
            created_unix: 1_700_000_000,
            key_source: KeySource::Kek(WrappedDek {
                kek: KekRef {
                    kind: ProtectorKind::Service,
                    key_id: "service:abcd".into(),
                },
                algorithm: WrapAlgorithm::A256Gcm,
                bytes: vec![5; 60],
            }),
            seals_reserved: 1 << 20,
            wal_salts: 0,
            wal_durable_frames: 0,
            infra: None,
            rotation: None,
            fs: None,
            db_name: None,
        }
    }

    fn sample_infra(dek: &Dek) -> FileHeader {
        FileHeader {
            infra: Some(InfraKeyRecord {
                dek_id: DekId([4; 16]),
                wrapped: WrappedDek {
                    kek: KekRef {
                        kind: ProtectorKind::Infrastructure,
                        key_id: "infra:abcd/v1".into(),
                    },
                    algorithm: WrapAlgorithm::Aegis256,
                    bytes: vec![6; crate::INFRA_WRAPPED_LEN],
                },
                unit_cipher: InfraUnitCipher::Aegis256,
            }),
            ..sample(dek)
        }
    }

    fn sample_infra_x2(dek: &Dek) -> FileHeader {
        let mut h = sample_infra(dek);
        h.infra.as_mut().unwrap().unit_cipher = InfraUnitCipher::Aegis256X2;
        h
    }

    /// A database mid-rotation is format 6 with its previous keys MAC'd;
    /// it returns to its layer set's format when the rotation ends, and a
    /// format-6 slot without rotation fields (or a WAL claiming them) is
    /// refused.
    #[test]
    fn a_rotating_database_is_format_6_and_round_trips() {
        let dek = Dek::generate().unwrap();
        for base in [sample(&dek), sample_infra_x2(&dek)] {
            let mut h = base.clone();
            h.rotation = Some(Rotation {
                previous_dek_id: DekId([1; 16]),
                previous_wrapped: match &base.key_source {
                    KeySource::Kek(w) => w.clone(),
                    _ => unreachable!(),
                },
                previous_infra: base.infra.clone().map(|mut r| {
                    r.dek_id = DekId([2; 16]);
                    r
                }),
                watermark: 1234,
                started_unix: 1_800_000_000,
            });
            let slot = h.encode(&dek).unwrap();
            assert_eq!(&slot[8..10], &VERSION_ROTATING.to_be_bytes());
            let back = FileHeader::decode_unverified(&slot)
                .unwrap()
                .unwrap()
                .verify(&dek)
                .unwrap();
            assert_eq!(back, h);
            // Altering the watermark breaks the MAC.
            let done = base.encode(&dek).unwrap();
            assert_ne!(&done[8..10], &VERSION_ROTATING.to_be_bytes());
            let mut forged = slot.clone();
            forged[8..10].copy_from_slice(&done[8..10]);
            assert!(FileHeader::decode_unverified(&forged).is_err());
        }
        let mut wal = sample(&dek);
        wal.kind = FileKind::Wal;
        wal.rotation = Some(Rotation {
            previous_dek_id: DekId([1; 16]),
            previous_wrapped: match &wal.key_source {
                KeySource::Kek(w) => w.clone(),
                _ => unreachable!(),
            },
            previous_infra: None,
            watermark: 0,
            started_unix: 0,
        });
        let slot = wal.encode(&dek).unwrap();
        assert!(FileHeader::decode_unverified(&slot).is_err());
    }

    /// Files created now seal the infrastructure layer with AEGIS-256X2:
    /// format 5, the cipher recorded and MAC'd. Format 3 means AEGIS-256
    /// and stays so when re-encoded; the two cannot be confused.
    #[test]
    fn x2_unit_cipher_is_format_5_and_format_3_stays_aegis_256() {
        let dek = Dek::generate().unwrap();
        let x2 = sample_infra_x2(&dek);
        let slot = x2.encode(&dek).unwrap();
        assert_eq!(&slot[8..10], &VERSION_INFRA_X2.to_be_bytes());
        let back = FileHeader::decode_unverified(&slot)
            .unwrap()
            .unwrap()
            .verify(&dek)
            .unwrap();
        assert_eq!(back, x2);
        let old = sample_infra(&dek);
        let slot3 = old.encode(&dek).unwrap();
        assert_eq!(&slot3[8..10], &VERSION_INFRA.to_be_bytes());
        let back3 = FileHeader::decode_unverified(&slot3)
            .unwrap()
            .unwrap()
            .verify(&dek)
            .unwrap();
        assert_eq!(
            back3.infra.as_ref().unwrap().unit_cipher,
            InfraUnitCipher::Aegis256
        );
        assert_eq!(back3.encode(&dek).unwrap()[8..10], slot3[8..10]);
        // Claiming the other format than the cipher recorded is refused.
        for (mut bad, v) in [
            (slot.clone(), VERSION_INFRA),
            (slot3.clone(), VERSION_INFRA_X2),
        ] {
            bad[8..10].copy_from_slice(&v.to_be_bytes());
            assert!(FileHeader::decode_unverified(&bad).is_err(), "format {v}");
        }
    }

    #[test]
    fn infra_layer_round_trips_and_is_covered_by_the_mac() {
        let dek = Dek::generate().unwrap();
        let h = sample_infra(&dek);
        assert_eq!(h.layers(), Layers::DATA_AND_INFRA);
        let slot = h.encode(&dek).unwrap();
        assert_eq!(&slot[8..10], &VERSION_INFRA.to_be_bytes());
        let back = FileHeader::decode_unverified(&slot)
            .unwrap()
            .unwrap()
            .verify(&dek)
            .unwrap();
        assert_eq!(back, h);
        assert_eq!(back.layers().names(), ["data", "infrastructure"]);
        let used =
            PREFIX_LEN + u32::from_be_bytes(slot[10..14].try_into().unwrap()) as usize + MAC_LEN;
        for pos in 0..used {
            let mut bad = slot.clone();
            bad[pos] ^= 0x01;
            let ok = FileHeader::decode_unverified(&bad)
                .ok()
                .flatten()
                .map(|u| u.verify(&dek).is_ok())
                .unwrap_or(false);
            assert!(!ok, "flip at {pos} went unnoticed");
        }
        // A data-only header keeps format 1 and names one layer.
        let plain = sample(&dek).encode(&dek).unwrap();
        assert_eq!(&plain[8..10], &1u16.to_be_bytes());
        let u = FileHeader::decode_unverified(&plain).unwrap().unwrap();
        assert_eq!(u.claims().layers(), Layers::DATA_ONLY);
        // Claiming format 1 while naming the infra layer is refused.
        let mut v1 = slot.clone();
        v1[8..10].copy_from_slice(&1u16.to_be_bytes());
        assert!(FileHeader::decode_unverified(&v1).is_err());
    }

    /// A WAL is written as format 4 with either layer set and reads back;
    /// a WAL claiming format 1 or 3 (the layout with separately sealed
    /// frame headers and pages) is refused with a message naming the
    /// layout; a non-WAL file may not claim format 4.
    #[test]
    fn wal_frame_unit_format_is_4_and_older_wals_are_refused() {
        let dek = Dek::generate().unwrap();
        for h in [sample(&dek), sample_infra_x2(&dek)] {
            let wal = FileHeader {
                kind: FileKind::Wal,
                ..h.clone()
            };
            let slot = wal.encode(&dek).unwrap();
            assert_eq!(&slot[8..10], &VERSION_WAL_FRAME_UNITS.to_be_bytes());
            let back = FileHeader::decode_unverified(&slot)
                .unwrap()
                .unwrap()
                .verify(&dek)
                .unwrap();
            assert_eq!(back, wal);
            for old in [VERSION, VERSION_INFRA] {
                let mut bad = slot.clone();
                bad[8..10].copy_from_slice(&old.to_be_bytes());
                let Err(CryptoError::UnsupportedFormat(msg)) = FileHeader::decode_unverified(&bad)
                else {
                    panic!("an old-layout WAL must be refused");
                };
                assert!(
                    msg.contains(&format!("format version {old}")) && msg.contains("one unit"),
                    "{msg}"
                );
            }
            let mut db = h.encode(&dek).unwrap();
            db[8..10].copy_from_slice(&VERSION_WAL_FRAME_UNITS.to_be_bytes());
            assert!(matches!(
                FileHeader::decode_unverified(&db),
                Err(CryptoError::InvalidHeader(_))
            ));
        }
        // A format-4 WAL's infrastructure layer is AEGIS-256X2, never AEGIS-256.
        let aegis256_wal = FileHeader {
            kind: FileKind::Wal,
            ..sample_infra(&dek)
        };
        let slot = aegis256_wal.encode(&dek).unwrap();
        assert!(matches!(
            FileHeader::decode_unverified(&slot),
            Err(CryptoError::InvalidHeader(_))
        ));
    }

    /// A file written by the pre-release XChaCha20-Poly1305 build (format 2)
    /// is refused with a message that names the format, not misread.
    #[test]
    fn retired_xchacha_format_is_refused_clearly() {
        let dek = Dek::generate().unwrap();
        let mut slot = sample_infra(&dek).encode(&dek).unwrap();
        slot[8..10].copy_from_slice(&VERSION_XCHACHA_INFRA.to_be_bytes());
        let Err(CryptoError::UnsupportedFormat(msg)) = FileHeader::decode_unverified(&slot) else {
            panic!("format 2 must be refused");
        };
        assert!(msg.contains("format version 2"), "{msg}");
        assert!(msg.contains("XChaCha20-Poly1305"), "{msg}");
        assert!(msg.contains("AEGIS-256"), "{msg}");
        // The old wrap algorithm id (XChaCha20-Poly1305 = 3) is not reused.
        assert_eq!(WrapAlgorithm::from_u8(3), None);
    }

    #[test]
    fn encode_decode_verify() {
        let dek = Dek::generate().unwrap();
        let h = sample(&dek);
        let slot = h.encode(&dek).unwrap();
        assert_eq!(slot.len(), HEADER_SLOT_SIZE);
        let back = FileHeader::decode_unverified(&slot)
            .unwrap()
            .unwrap()
            .verify(&dek)
            .unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn any_change_breaks_the_mac_or_the_parse() {
        let dek = Dek::generate().unwrap();
        let slot = sample(&dek).encode(&dek).unwrap();
        let used =
            PREFIX_LEN + u32::from_be_bytes(slot[10..14].try_into().unwrap()) as usize + MAC_LEN;
        for pos in 0..used {
            let mut bad = slot.clone();
            bad[pos] ^= 0x01;
            let ok = FileHeader::decode_unverified(&bad)
                .ok()
                .flatten()
                .map(|u| u.verify(&dek).is_ok())
                .unwrap_or(false);
            assert!(!ok, "flip at {pos} went unnoticed");
        }
    }

    #[test]
    fn wrong_dek_fails_and_zero_slot_is_empty() {
        let dek = Dek::generate().unwrap();
        let slot = sample(&dek).encode(&dek).unwrap();
        let other = Dek::generate().unwrap();
        let u = FileHeader::decode_unverified(&slot).unwrap().unwrap();
        assert_eq!(
            u.verify(&other),
            Err(CryptoError::HeaderAuthenticationFailed)
        );
        assert!(FileHeader::decode_unverified(&[0u8; HEADER_SLOT_SIZE])
            .unwrap()
            .is_none());
        assert!(FileHeader::decode_unverified(b"SQLite format 3\0rest").is_err());
    }
}
