//! The FUSE filesystem: a plaintext view of a directory of sealed files.
//!
//! The ciphertext directory mirrors the plaintext tree: same names, same
//! directories, same owners and modes; each regular file is sealed
//! (`file.rs`). Inodes are numbered by this process; each known inode maps
//! to a path under the ciphertext directory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirEntryExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::file::{CryptFile, Rekey};
use crate::keys::RootKey;
use crate::FsError;

const TTL: Duration = Duration::from_secs(1);

/// A DEK rotation under way: when it began (every file whose DEK is not
/// newer is rotated) and how many units it found to rotate.
pub const ROTATION_FILE: &str = ".atrest-rotation";
/// Where a rotation writes a file's new ciphertext before the switch.
const ROTATE_DIR: &str = ".atrest-rotate";

/// Names at the tree's root that are atrest-fs's own (the root key, the
/// rotation's record and scratch directory): not shown, not usable.
fn reserved(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".atrest-")
}

/// How many slots a new file gets (see `file.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPolicy {
    /// Two slots for every file.
    AllTwo,
    /// PostgreSQL: one slot for relation data files (main, visibility map
    /// and init forks under `base/`, `global/` and tablespaces), whose torn
    /// pages PostgreSQL restores from full-page images; two for everything
    /// else (WAL, pg_xact and the other SLRUs, pg_control, the free space
    /// map, logs, ...).
    Postgres,
}

impl SlotPolicy {
    pub fn slots_for(self, rel: &Path) -> u8 {
        match self {
            SlotPolicy::AllTwo => 2,
            SlotPolicy::Postgres => {
                // Relative to any directory above the data directory: a
                // relation file sits in `global/`, `base/DBOID/` or a
                // tablespace's `PG_*/DBOID/`.
                let name = rel.file_name().and_then(OsStr::to_str).unwrap_or("");
                let parent = rel.parent();
                let pname = parent.and_then(Path::file_name).and_then(OsStr::to_str);
                let gname = parent
                    .and_then(Path::parent)
                    .and_then(Path::file_name)
                    .and_then(OsStr::to_str);
                let db_dir = pname
                    .is_some_and(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
                    && gname.is_some_and(|g| g == "base" || g.starts_with("PG_"));
                if is_relation_file(name) && (pname == Some("global") || db_dir) {
                    1
                } else {
                    2
                }
            }
        }
    }
}

/// `1234`, `1234.5`, `1234_vm`, `1234_init.2` (not `_fsm`: the free space
/// map is not WAL-logged, so it keeps two slots).
fn is_relation_file(name: &str) -> bool {
    let base = name.split_once('.').map_or(name, |(b, seg)| {
        if !seg.is_empty() && seg.bytes().all(|c| c.is_ascii_digit()) {
            b
        } else {
            "x"
        }
    });
    let digits = base
        .strip_suffix("_vm")
        .or_else(|| base.strip_suffix("_init"))
        .unwrap_or(base);
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
}

/// Mount settings.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_files_get_one_slot_everything_else_two() {
        let p = SlotPolicy::Postgres;
        for one in [
            "pgdata/base/5/16384",
            "base/5/16384.1",
            "pgdata/global/1262",
            "x/base/16385/2619_vm",
            "pgdata/base/5/16390_init",
            "pg_tblspc/16400/PG_15_202209061/5/16401",
        ] {
            assert_eq!(p.slots_for(Path::new(one)), 1, "{one}");
        }
        for two in [
            "pgdata/base/5/16384_fsm",
            "pgdata/pg_wal/000000010000000000000001",
            "pgdata/pg_xact/0000",
            "pgdata/global/pg_control",
            "pgdata/global/pg_filenode.map",
            "pgdata/base/5/pg_filenode.map",
            "pgdata/base/pgsql_tmp/pgsql_tmp123.0",
            "pgdata/log/postgresql.log",
            "pgdata/base/5/PG_VERSION",
            "pgdata/16384",
        ] {
            assert_eq!(p.slots_for(Path::new(two)), 2, "{two}");
        }
        assert_eq!(
            SlotPolicy::AllTwo.slots_for(Path::new("pgdata/base/5/1")),
            2
        );
    }
}

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub policy: SlotPolicy,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let users other than the mounting one use the mount (the database
    /// runs as an unprivileged user; the kernel still checks modes).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            policy: SlotPolicy::Postgres,
            threads: 2,
            allow_other: true,
        }
    }
}

/// Counters for `/metrics` and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub auth_failures: AtomicU64,
}

struct Node {
    /// Relative to the ciphertext directory; `None` once unlinked.
    path: Option<PathBuf>,
    lookups: u64,
    file: Option<Arc<CryptFile>>,
}

#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

type Registry = Arc<Mutex<HashMap<u64, std::sync::Weak<CryptFile>>>>;

/// The filesystem. Shared by the FUSE worker threads.
pub struct AtrestFs {
    dir: PathBuf,
    root: Arc<RootKey>,
    policy: SlotPolicy,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, (u64, Arc<CryptFile>)>>,
    /// Every sealed-file state alive, by ciphertext inode number (shared
    /// with the [`Tree`] handle).
    open_files: Registry,
    /// Held (shared) while a name changes (rename, unlink), and
    /// exclusively while a rotation puts a file's new ciphertext in place:
    /// the rotation's "is this path still that file" check and its rename
    /// are one step for every other name change.
    names: Arc<RwLock<()>>,
    next_fh: AtomicU64,
    stats: Arc<Stats>,
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn ioerr(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn systime(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

impl AtrestFs {
    pub fn new(dir: PathBuf, root: RootKey, policy: SlotPolicy) -> Self {
        let mut inodes = Inodes {
            next: 2,
            ..Default::default()
        };
        inodes.by_ino.insert(
            1,
            Node {
                path: Some(PathBuf::new()),
                lookups: 1,
                file: None,
            },
        );
        inodes.by_path.insert(PathBuf::new(), 1);
        AtrestFs {
            dir,
            root: Arc::new(root),
            policy,
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            open_files: Arc::new(Mutex::new(HashMap::new())),
            names: Arc::new(RwLock::new(())),
            next_fh: AtomicU64::new(1),
            stats: Arc::new(Stats::default()),
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// A handle on the tree for what happens beside the mount: rewraps.
    pub fn tree(&self) -> Tree {
        Tree {
            dir: self.dir.clone(),
            root: Arc::clone(&self.root),
            open_files: Arc::clone(&self.open_files),
            names: Arc::clone(&self.names),
        }
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.dir.join(rel)
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        let inodes = self.inodes.lock().unwrap();
        inodes
            .by_ino
            .get(&ino.0)
            .and_then(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        let p = self.path_of(parent)?;
        if p.as_os_str().is_empty() && reserved(name) {
            return Err(Errno::EACCES);
        }
        Ok(p.join(name))
    }

    /// The inode for `rel`, counting one lookup.
    fn remember(&self, rel: &Path, file: Option<Arc<CryptFile>>) -> u64 {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(&ino) = inodes.by_path.get(rel) {
            let n = inodes.by_ino.get_mut(&ino).unwrap();
            n.lookups += 1;
            if n.file.is_none() {
                n.file = file;
            }
            return ino;
        }
        let ino = inodes.next;
        inodes.next += 1;
        inodes.by_ino.insert(
            ino,
            Node {
                path: Some(rel.to_path_buf()),
                lookups: 1,
                file,
            },
        );
        inodes.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    /// The sealed file behind `ino`, opened on first use.
    fn crypt(&self, ino: u64) -> Result<Arc<CryptFile>, Errno> {
        let rel = {
            let inodes = self.inodes.lock().unwrap();
            let n = inodes.by_ino.get(&ino).ok_or(Errno::ENOENT)?;
            if let Some(f) = &n.file {
                return Ok(Arc::clone(f));
            }
            n.path.clone().ok_or(Errno::ENOENT)?
        };
        let f = self.open_crypt(&rel)?;
        let mut inodes = self.inodes.lock().unwrap();
        let n = inodes.by_ino.get_mut(&ino).ok_or(Errno::ENOENT)?;
        Ok(Arc::clone(n.file.get_or_insert(f)))
    }

    /// The one sealed-file state of the ciphertext file at `rel`. Two
    /// states of one file would each count its sequence numbers and write
    /// its header, and the later reader could take an older version for
    /// the newer: every open goes through the registry, and a state is
    /// closed (its counts written back) under the same lock.
    fn open_crypt(&self, rel: &Path) -> Result<Arc<CryptFile>, Errno> {
        let real = self.real(rel);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&real)
            .map_err(ioerr)?;
        let key = file.metadata().map_err(ioerr)?.ino();
        let mut open = self.open_files.lock().unwrap();
        if let Some(f) = open.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(f);
        }
        let f = CryptFile::open(file, &rel.display().to_string(), &self.root).map_err(|e| {
            self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("{e}");
            errno(&e)
        })?;
        let f = Arc::new(f);
        open.insert(key, Arc::downgrade(&f));
        Ok(f)
    }

    fn register(&self, f: &Arc<CryptFile>, ino: u64) {
        self.open_files
            .lock()
            .unwrap()
            .insert(ino, Arc::downgrade(f));
    }

    fn attr(&self, ino: u64, rel: &Path, file: Option<&CryptFile>) -> Result<FileAttr, Errno> {
        let md = std::fs::symlink_metadata(self.real(rel)).map_err(ioerr)?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else if ft.is_file() {
            FileType::RegularFile
        } else {
            return Err(Errno::EPERM);
        };
        let size = match (kind, file) {
            (FileType::RegularFile, Some(f)) => f.size(),
            (FileType::RegularFile, None) => self.crypt(ino)?.size(),
            _ => md.size(),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: systime(md.atime(), md.atime_nsec()),
            mtime: systime(md.mtime(), md.mtime_nsec()),
            ctime: systime(md.ctime(), md.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (md.mode() & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: md.uid(),
            gid: md.gid(),
            rdev: 0,
            blksize: crate::layout::UNIT as u32,
            flags: 0,
        })
    }

    fn entry(&self, rel: &Path, file: Option<Arc<CryptFile>>) -> Result<(u64, FileAttr), Errno> {
        let md = std::fs::symlink_metadata(self.real(rel)).map_err(ioerr)?;
        let file = match file {
            Some(f) => Some(f),
            None if md.file_type().is_file() => Some(self.open_crypt(rel)?),
            None => None,
        };
        let ino = self.remember(rel, file);
        let f = self.crypt_if_file(ino);
        match self.attr(ino, rel, f.as_deref()) {
            Ok(a) => Ok((ino, a)),
            Err(e) => {
                self.forget_n(ino, 1);
                Err(e)
            }
        }
    }

    fn crypt_if_file(&self, ino: u64) -> Option<Arc<CryptFile>> {
        let inodes = self.inodes.lock().unwrap();
        inodes.by_ino.get(&ino).and_then(|n| n.file.clone())
    }

    fn forget_n(&self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        let dropped = {
            let mut inodes = self.inodes.lock().unwrap();
            let Some(node) = inodes.by_ino.get_mut(&ino) else {
                return;
            };
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups > 0 {
                return;
            }
            let node = inodes.by_ino.remove(&ino).unwrap();
            if let Some(p) = &node.path {
                if inodes.by_path.get(p) == Some(&ino) {
                    inodes.by_path.remove(p);
                }
            }
            node.file
        };
        if let Some(f) = dropped {
            self.close_if_last(f);
        }
    }

    /// Writes back a file's state when no inode or handle holds it.
    fn close_if_last(&self, f: Arc<CryptFile>) {
        close_if_last(&self.open_files, f)
    }

    fn chown_new(&self, real: &Path, req: &Request) -> Result<(), Errno> {
        std::os::unix::fs::lchown(real, Some(req.uid()), Some(req.gid())).map_err(ioerr)
    }

    fn new_handle(&self, ino: u64, f: Arc<CryptFile>) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, (ino, f));
        FileHandle(fh)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<CryptFile>, Errno> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .map(|(_, f)| Arc::clone(f))
            .ok_or(Errno::EBADF)
    }

    /// Moves the paths of `from` and everything below it to `to`.
    fn repath(&self, from: &Path, to: &Path) {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(old) = inodes.by_path.remove(to) {
            if let Some(n) = inodes.by_ino.get_mut(&old) {
                n.path = None;
            }
        }
        let moved: Vec<(PathBuf, u64)> = inodes
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        for (p, ino) in moved {
            inodes.by_path.remove(&p);
            let rest = p.strip_prefix(from).unwrap();
            let np = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                if let Some(f) = &n.file {
                    f.set_name(&np.display().to_string());
                }
                n.path = Some(np.clone());
            }
            inodes.by_path.insert(np, ino);
        }
    }

    fn unlinked(&self, rel: &Path) {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(ino) = inodes.by_path.remove(rel) {
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                n.path = None;
            }
        }
    }

    fn create_file(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(u64, FileAttr, Arc<CryptFile>), Errno> {
        let rel = self.child(parent, name)?;
        let real = self.real(&rel);
        let excl = flags & libc_o_excl() != 0;
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&real)
        {
            Ok(file) => {
                let slots = self.policy.slots_for(&rel);
                let cf = CryptFile::create(file, &rel.display().to_string(), &self.root, slots)
                    .map_err(|e| errno(&e))?;
                // The header must be on disk before the name is.
                self.chown_new(&real, req)?;
                std::fs::set_permissions(
                    &real,
                    std::fs::Permissions::from_mode(mode & !umask & 0o7777),
                )
                .map_err(ioerr)?;
                let cf = Arc::new(cf);
                let real_ino = std::fs::metadata(&real).map_err(ioerr)?.ino();
                self.register(&cf, real_ino);
                let (ino, attr) = self.entry(&rel, Some(Arc::clone(&cf)))?;
                Ok((ino, attr, cf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !excl => {
                let (ino, _) = self.entry(&rel, None)?;
                let cf = self.crypt(ino)?;
                if flags & libc_o_trunc() != 0 {
                    cf.truncate(0).map_err(|e| errno(&e))?;
                }
                let attr = self.attr(ino, &rel, Some(&cf))?;
                Ok((ino, attr, cf))
            }
            Err(e) => Err(ioerr(e)),
        }
    }
}

fn libc_o_excl() -> i32 {
    rustix::fs::OFlags::EXCL.bits() as i32
}
fn libc_o_trunc() -> i32 {
    rustix::fs::OFlags::TRUNC.bits() as i32
}

fn to_timestamp(t: Option<TimeOrNow>) -> rustix::fs::Timespec {
    match t {
        None => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            rustix::fs::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            }
        }
    }
}

impl Filesystem for AtrestFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        let files: Vec<Arc<CryptFile>> = {
            let mut inodes = self.inodes.lock().unwrap();
            let v = inodes
                .by_ino
                .values_mut()
                .filter_map(|n| n.file.take())
                .collect();
            inodes.by_ino.clear();
            inodes.by_path.clear();
            v
        };
        self.handles.lock().unwrap().clear();
        for f in files {
            self.close_if_last(f);
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .child(parent, name)
            .and_then(|rel| self.entry(&rel, None))
        {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_n(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.path_of(ino).and_then(|rel| {
            let f = match fh {
                Some(fh) => self.handle(fh).ok(),
                None => self.crypt_if_file(ino.0),
            };
            self.attr(ino.0, &rel, f.as_deref())
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let rel = self.path_of(ino)?;
            let real = self.real(&rel);
            if let Some(m) = mode {
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(m & 0o7777))
                    .map_err(ioerr)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&real, uid, gid).map_err(ioerr)?;
            }
            if let Some(s) = size {
                let f = match fh {
                    Some(fh) => self.handle(fh)?,
                    None => self.crypt(ino.0)?,
                };
                f.truncate(s).map_err(|e| errno(&e))?;
            }
            if atime.is_some() || mtime.is_some() {
                let ts = rustix::fs::Timestamps {
                    last_access: to_timestamp(atime),
                    last_modification: to_timestamp(mtime),
                };
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &real,
                    &ts,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            }
            let f = self.crypt_if_file(ino.0);
            self.attr(ino.0, &rel, f.as_deref())
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .path_of(ino)
            .and_then(|rel| std::fs::read_link(self.real(&rel)).map_err(ioerr))
        {
            Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & 0o170000 != 0o100000 {
            return reply.error(Errno::EPERM);
        }
        match self.create_file(req, parent, name, mode, umask, libc_o_excl()) {
            Ok((_, attr, _)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let rel = self.child(parent, name)?;
            let real = self.real(&rel);
            std::fs::create_dir(&real).map_err(ioerr)?;
            self.chown_new(&real, req)?;
            std::fs::set_permissions(
                &real,
                std::fs::Permissions::from_mode(mode & !umask & 0o7777),
            )
            .map_err(ioerr)?;
            self.entry(&rel, None)
        })();
        match r {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _names = self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = self.child(parent, name).and_then(|rel| {
            std::fs::remove_file(self.real(&rel)).map_err(ioerr)?;
            self.unlinked(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _names = self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = self.child(parent, name).and_then(|rel| {
            std::fs::remove_dir(self.real(&rel)).map_err(ioerr)?;
            self.unlinked(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let rel = self.child(parent, link_name)?;
            let real = self.real(&rel);
            std::os::unix::fs::symlink(target, &real).map_err(ioerr)?;
            self.chown_new(&real, req)?;
            self.entry(&rel, None)
        })();
        match r {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _names = self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            let rflags = rustix::fs::RenameFlags::from_bits_truncate(flags.bits());
            if rflags.contains(rustix::fs::RenameFlags::EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                self.real(&from),
                rustix::fs::CWD,
                self.real(&to),
                rflags,
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            self.repath(&from, &to);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.crypt(ino.0).and_then(|f| {
            if flags.0 & libc_o_trunc() != 0 {
                f.truncate(0).map_err(|e| errno(&e))?;
            }
            Ok(self.new_handle(ino.0, f))
        });
        match r {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_file(req, parent, name, mode, umask, flags) {
            Ok((ino, attr, f)) => {
                let fh = self.new_handle(ino, f);
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let r = self.handle(fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let n = f.read_at(offset, &mut buf).map_err(|e| {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                errno(&e)
            })?;
            buf.truncate(n);
            Ok(zeroize::Zeroizing::new(buf))
        });
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        match self
            .handle(fh)
            .and_then(|f| f.write_at(offset, data).map_err(|e| errno(&e)))
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let f = self.handles.lock().unwrap().remove(&fh.0);
        if let Some((_, f)) = f {
            self.close_if_last(f);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        match self
            .handle(fh)
            .and_then(|f| f.sync().map_err(|e| errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = (|| {
            let rel = self.path_of(ino)?;
            let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (1, FileType::Directory, "..".into()),
            ];
            let mut names = vec![];
            for e in std::fs::read_dir(self.real(&rel)).map_err(ioerr)? {
                let e = e.map_err(ioerr)?;
                let name = e.file_name();
                if rel.as_os_str().is_empty() && reserved(&name) {
                    continue;
                }
                let ft = e.file_type().map_err(ioerr)?;
                let kind = if ft.is_dir() {
                    FileType::Directory
                } else if ft.is_symlink() {
                    FileType::Symlink
                } else {
                    FileType::RegularFile
                };
                names.push((e.ino(), kind, name));
            }
            names.sort_by(|a, b| a.2.cmp(&b.2));
            entries.extend(names);
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino.max(1)), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.path_of(ino).and_then(|rel| {
            File::open(self.real(&rel))
                .and_then(|d| d.sync_all())
                .map_err(ioerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.dir) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes are kept (they would be metadata in clear).
        // ENOSYS, not ENODATA: the kernel then stops asking (it asks for
        // security.capability before every write, one more round trip per
        // commit) and tells callers EOPNOTSUPP.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has checked the mode bits.
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP_SIZE: i32 = 1;
        let r = self.handle(fh).and_then(|f| {
            if mode & !KEEP_SIZE != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let end = offset + length;
            if mode & KEEP_SIZE == 0 && end > f.size() {
                f.truncate(end).map_err(|e| errno(&e))?;
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted tree, seen from beside the mount: the server rewraps it
/// when its key changes. Holds the root key: drop it with the session.
#[derive(Clone)]
pub struct Tree {
    dir: PathBuf,
    root: Arc<RootKey>,
    open_files: Registry,
    names: Arc<RwLock<()>>,
}

impl Tree {
    /// Rewraps the tree under `protector`'s current KEK while it is in
    /// use: the root header, then the copy of the root's wrapped DEK in
    /// every file's header. Units are never touched. Files renamed behind
    /// the walk are found by the next pass: it ends when a pass changes
    /// nothing. Returns how many file headers changed.
    pub fn rewrap(&self, protector: &dyn atrest_crypto::KeyProtector) -> Result<usize, FsError> {
        self.root.rewrap(&self.dir, protector)?;
        let wrapped = self.root.wrapped();
        let mut total = 0;
        for _pass in 0..8 {
            let mut changed = 0;
            let mut failed = None;
            for rel in walk(&self.dir) {
                match self.rewrap_file(&rel, &wrapped) {
                    Ok(c) => changed += usize::from(c),
                    Err(e) => failed = Some(e),
                }
            }
            total += changed;
            match failed {
                // A file being created while the pass read it, or one
                // whose header does not verify: the next pass tells.
                Some(e) if _pass == 7 => return Err(e),
                Some(_) => continue,
                None if changed == 0 => return Ok(total),
                None => {}
            }
        }
        Ok(total)
    }

    fn rewrap_file(
        &self,
        rel: &Path,
        wrapped: &atrest_crypto::WrappedDek,
    ) -> Result<bool, FsError> {
        let real = self.dir.join(rel);
        let name = rel.display().to_string();
        let file = match OpenOptions::new().read(true).write(true).open(&real) {
            Ok(f) => f,
            // Unlinked or renamed since the walk saw it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(FsError::io(format!("open {}", real.display()), e)),
        };
        let ino = file
            .metadata()
            .map_err(|e| FsError::io(format!("stat {}", real.display()), e))?
            .ino();
        // Under the registry's lock: the mount cannot open a second state
        // of this file, nor close the one it has, meanwhile.
        let open = self.open_files.lock().unwrap();
        if let Some(f) = open.get(&ino).and_then(std::sync::Weak::upgrade) {
            let r = f.rewrap_parent(wrapped);
            drop(f);
            return r;
        }
        let f = CryptFile::open(file, &name, &self.root)?;
        let r = f.rewrap_parent(wrapped);
        f.close()?;
        drop(open);
        r
    }
}

/// A DEK rotation of the tree, as recorded in [`ROTATION_FILE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationMark {
    /// Every file whose DEK was made at or before this second is rotated.
    pub started_unix: u64,
    /// Units found to rotate when it began.
    pub units_total: u64,
}

/// See [`Tree::dek_facts`].
struct DekFacts {
    created_unix: u64,
    units: u64,
    seals: u64,
}

/// One file's rotation under way (see [`Tree::rekey_start`]). Dropped
/// without [`Tree::rekey_finish`] or [`Tree::rekey_abort`], it switches
/// nothing and its keys go with it.
pub struct FileRekey {
    rel: PathBuf,
    ino: u64,
    tmp: PathBuf,
    file: Arc<CryptFile>,
    rekey: Option<Rekey>,
    pub units: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsError::io(format!("sync directory {}", dir.display()), e))
}

impl Tree {
    /// The rotation under way, if one is.
    pub fn rotation(&self) -> Option<RotationMark> {
        let text = std::fs::read_to_string(self.dir.join(ROTATION_FILE)).ok()?;
        let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
        Some(RotationMark {
            started_unix: it.next()??,
            units_total: it.next()??,
        })
    }

    /// Begins a DEK rotation of every file, or returns the one under way.
    /// The record is durable before this returns, and the clock has moved
    /// past its second: every file made or re-sealed from now on has a
    /// newer DEK than the mark.
    pub fn begin_rotation(&self) -> Result<RotationMark, FsError> {
        if let Some(m) = self.rotation() {
            return Ok(m);
        }
        let started_unix = now_unix();
        let units_total = self
            .rotation_pending(started_unix)
            .iter()
            .map(|p| p.1)
            .sum();
        let mark = RotationMark {
            started_unix,
            units_total,
        };
        let tmp = self.dir.join(format!("{ROTATION_FILE}.new"));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(
                &mut f,
                format!("{started_unix} {units_total}\n").as_bytes(),
            )?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join(ROTATION_FILE))
        };
        write().map_err(|e| {
            FsError::io(format!("record the rotation in {}", self.dir.display()), e)
        })?;
        sync_dir(&self.dir)?;
        while now_unix() <= started_unix {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(mark)
    }

    /// Ends the rotation: no file's DEK predates it any more.
    pub fn end_rotation(&self) -> Result<(), FsError> {
        match std::fs::remove_file(self.dir.join(ROTATION_FILE)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FsError::io("end the rotation".into(), e)),
        }?;
        let _ = std::fs::remove_dir_all(self.dir.join(ROTATE_DIR));
        Ok(())
    }

    /// What the rotation needs of every file of the tree, from its live
    /// state when open, else from its header: when its DEK was made, its
    /// units, and the seals its DEK has made (a closed file's header
    /// reservation is an upper bound). `None`: its header does not open
    /// (rotating it reports why).
    fn dek_facts(&self) -> Vec<(PathBuf, Option<DekFacts>)> {
        let mut out = Vec::new();
        for rel in walk(&self.dir) {
            let Ok(file) = File::open(self.dir.join(&rel)) else {
                continue;
            };
            let Ok(md) = file.metadata() else { continue };
            let live = self
                .open_files
                .lock()
                .unwrap()
                .get(&md.ino())
                .and_then(std::sync::Weak::upgrade);
            let facts = match live {
                Some(f) => Some(DekFacts {
                    created_unix: f.dek_created_unix(),
                    units: f.size().div_ceil(crate::layout::UNIT as u64),
                    seals: f.sealed_count(),
                }),
                None => crate::file::header_of(&file, &rel.display().to_string(), &self.root)
                    .ok()
                    .map(|h| DekFacts {
                        created_unix: h.created_unix,
                        units: crate::layout::Layout {
                            slots: h.fs.map_or(1, |f| f.slots),
                            infra: h.infra.is_some(),
                        }
                        .units_in(md.len()),
                        seals: h.seals_reserved,
                    }),
            };
            out.push((rel, facts));
        }
        out
    }

    /// The files whose DEK was made at or before `started_unix` (or whose
    /// header does not open), with their units.
    pub fn rotation_pending(&self, started_unix: u64) -> Vec<(PathBuf, u64)> {
        self.dek_facts()
            .into_iter()
            .filter_map(|(rel, f)| match f {
                Some(f) if f.created_unix > started_unix => None,
                Some(f) => Some((rel, f.units)),
                None => Some((rel, 0)),
            })
            .collect()
    }

    /// The most seals any file's DEK has made: for the usage limit.
    pub fn most_seals(&self) -> u64 {
        self.dek_facts()
            .into_iter()
            .filter_map(|(_, f)| f.map(|f| f.seals))
            .max()
            .unwrap_or(0)
    }

    /// Starts re-sealing the file at `rel` under new DEKs, if its DEK was
    /// made at or before `started_unix` (`None`: it is gone, or already
    /// newer). The file stays in use throughout.
    pub fn rekey_start(&self, rel: &Path, started_unix: u64) -> Result<Option<FileRekey>, FsError> {
        let real = self.dir.join(rel);
        let name = rel.display().to_string();
        let file = match OpenOptions::new().read(true).write(true).open(&real) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::io(format!("open {}", real.display()), e)),
        };
        let md = file
            .metadata()
            .map_err(|e| FsError::io(format!("stat {}", real.display()), e))?;
        let cf = {
            // Under the registry's lock: one state per file, shared with
            // the mount (which sees this one if it opens the file now).
            let mut open = self.open_files.lock().unwrap();
            match open.get(&md.ino()).and_then(std::sync::Weak::upgrade) {
                Some(f) => f,
                None => {
                    let f = Arc::new(CryptFile::open(file, &name, &self.root)?);
                    open.insert(md.ino(), Arc::downgrade(&f));
                    f
                }
            }
        };
        if cf.dek_created_unix() > started_unix {
            close_if_last(&self.open_files, cf);
            return Ok(None);
        }
        let scratch = self.dir.join(ROTATE_DIR);
        std::fs::create_dir_all(&scratch)
            .map_err(|e| FsError::io(format!("create {}", scratch.display()), e))?;
        let tmp = scratch.join(md.ino().to_string());
        let _ = std::fs::remove_file(&tmp);
        let made = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(md.mode() & 0o7777)
            .open(&tmp)
            .and_then(|f| {
                std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid()))?;
                f.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
                Ok(f)
            });
        let tmp_file = match made {
            Ok(f) => f,
            Err(e) => {
                close_if_last(&self.open_files, cf);
                return Err(FsError::io(format!("create {}", tmp.display()), e));
            }
        };
        let rekey = match cf.rekey_begin(tmp_file, &self.root) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                close_if_last(&self.open_files, cf);
                return Err(e);
            }
        };
        Ok(Some(FileRekey {
            units: cf.size().div_ceil(crate::layout::UNIT as u64),
            rel: rel.to_path_buf(),
            ino: md.ino(),
            tmp,
            file: cf,
            rekey: Some(rekey),
        }))
    }

    /// Copies up to `units` more units of the file; 0 when all are.
    pub fn rekey_copy(&self, fr: &mut FileRekey, units: u64) -> Result<u64, FsError> {
        let r = fr.rekey.as_mut().expect("a rotation under way");
        fr.file.rekey_copy(r, units)
    }

    /// Puts the file's new ciphertext in place of the old (see
    /// [`CryptFile::rekey_switch`]). `false`: the file was renamed or
    /// removed meanwhile, and the next pass finds it where it is now.
    pub fn rekey_finish(&self, mut fr: FileRekey) -> Result<bool, FsError> {
        let rekey = fr.rekey.take().expect("a rotation under way");
        let real = self.dir.join(&fr.rel);
        let switched = {
            let _names = self
                .names
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let wrapped = self.root.wrapped();
            fr.file.rekey_switch(rekey, &wrapped, || {
                let m = match std::fs::symlink_metadata(&real) {
                    Ok(m) if m.ino() == fr.ino => m,
                    _ => return Ok(false),
                };
                // The owner and mode as they are now (changed since the
                // copy began, they would be lost with the old inode).
                std::os::unix::fs::chown(&fr.tmp, Some(m.uid()), Some(m.gid()))
                    .and_then(|_| {
                        std::fs::set_permissions(
                            &fr.tmp,
                            std::fs::Permissions::from_mode(m.mode() & 0o7777),
                        )
                    })
                    .map_err(|e| {
                        FsError::io(format!("set the owner of {}", fr.tmp.display()), e)
                    })?;
                std::fs::rename(&fr.tmp, &real).map_err(|e| {
                    FsError::io(format!("rename {} into place", fr.tmp.display()), e)
                })?;
                sync_dir(real.parent().unwrap_or(&self.dir))?;
                Ok(true)
            })
        };
        match switched {
            Ok(true) => {
                if let Ok(md) = std::fs::metadata(&real) {
                    let mut open = self.open_files.lock().unwrap();
                    open.remove(&fr.ino);
                    open.insert(md.ino(), Arc::downgrade(&fr.file));
                }
            }
            Ok(false) | Err(_) => {
                let _ = std::fs::remove_file(&fr.tmp);
            }
        }
        let FileRekey { file, .. } = fr;
        close_if_last(&self.open_files, file);
        switched
    }

    /// Gives up the file's rotation; the file stays as it was.
    pub fn rekey_abort(&self, mut fr: FileRekey) {
        if let Some(r) = fr.rekey.take() {
            fr.file.rekey_abort(r);
        }
        let _ = std::fs::remove_file(&fr.tmp);
        let FileRekey { file, .. } = fr;
        close_if_last(&self.open_files, file);
    }
}

impl Tree {
    /// The KEK the tree's root key is wrapped under now.
    pub fn kek(&self) -> atrest_crypto::KekRef {
        self.root.kek()
    }

    /// The live state of the tree file `rel` (registered, so the mount
    /// shares it), or `None` when it is gone.
    fn state_of(&self, rel: &Path) -> Result<Option<Arc<CryptFile>>, FsError> {
        let real = self.dir.join(rel);
        let file = match OpenOptions::new().read(true).write(true).open(&real) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::io(format!("open {}", real.display()), e)),
        };
        let ino = file
            .metadata()
            .map_err(|e| FsError::io(format!("stat {}", real.display()), e))?
            .ino();
        let mut open = self.open_files.lock().unwrap();
        if let Some(f) = open.get(&ino).and_then(std::sync::Weak::upgrade) {
            return Ok(Some(f));
        }
        let f = Arc::new(CryptFile::open(
            file,
            &rel.display().to_string(),
            &self.root,
        )?);
        open.insert(ino, Arc::downgrade(&f));
        Ok(Some(f))
    }

    /// Copies the sealed file `rel` of the tree, as it is, to `dst` (a new
    /// file, synced), while the tree is in use: the file's operations wait
    /// for the copy, so it is the file at one moment. `None`: `rel` is
    /// gone.
    pub fn copy_out(&self, rel: &Path, dst: &Path) -> Result<Option<u64>, FsError> {
        let Some(f) = self.state_of(rel)? else {
            return Ok(None);
        };
        let r = File::create(dst)
            .map_err(|e| FsError::io(format!("create {}", dst.display()), e))
            .and_then(|d| f.copy_ciphertext(&d));
        close_if_last(&self.open_files, f);
        r.map(Some)
    }

    /// Writes `bytes` as a new sealed file at `dst` (outside the tree,
    /// under the tree's keys), synced.
    pub fn seal_out(&self, dst: &Path, bytes: &[u8]) -> Result<(), FsError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(|e| FsError::io(format!("create {}", dst.display()), e))?;
        let name = dst.display().to_string();
        let f = CryptFile::create(file, &name, &self.root, 2)?;
        f.write_at(0, bytes)?;
        // The close writes the maps and the exact seal count; the sync
        // after it makes them durable.
        f.close()?;
        f.sync()
    }

    /// Opens a sealed file of this tree kept outside it (a backup's copy,
    /// an archived WAL segment) and authenticates every unit. Returns the
    /// units, or the first failure naming file and unit.
    pub fn verify_outside(&self, path: &Path) -> Result<u64, FsError> {
        let file =
            File::open(path).map_err(|e| FsError::io(format!("open {}", path.display()), e))?;
        let f = CryptFile::open(file, &path.display().to_string(), &self.root)?;
        f.verify_units()
    }

    /// Reads a sealed file of this tree kept outside it, whole.
    pub fn read_outside(&self, path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, FsError> {
        let file =
            File::open(path).map_err(|e| FsError::io(format!("open {}", path.display()), e))?;
        let f = CryptFile::open(file, &path.display().to_string(), &self.root)?;
        let mut out = zeroize::Zeroizing::new(vec![0u8; f.size() as usize]);
        let n = f.read_at(0, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Rewraps the copies of this tree's files kept under `dir` (backups,
    /// the WAL archive) like [`Tree::rewrap`] does the tree's own: only
    /// headers change. Files named `*.tmp` (an archive copy being made)
    /// are left; the next pass sees them under their final name. Returns
    /// how many headers changed.
    pub fn rewrap_outside(&self, dir: &Path) -> Result<usize, FsError> {
        let wrapped = self.root.wrapped();
        let mut total = 0;
        for _pass in 0..8 {
            let mut changed = 0;
            for rel in walk(dir) {
                if rel.extension().is_some_and(|e| e == "tmp") {
                    continue;
                }
                let path = dir.join(&rel);
                let file = match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(FsError::io(format!("open {}", path.display()), e)),
                };
                let f = CryptFile::open(file, &path.display().to_string(), &self.root)?;
                changed += usize::from(f.rewrap_parent(&wrapped)?);
                f.close()?;
            }
            total += changed;
            if changed == 0 {
                break;
            }
        }
        Ok(total)
    }
}

impl FileRekey {
    /// The file, relative to the tree.
    pub fn rel(&self) -> &Path {
        &self.rel
    }
}

/// Writes back a file's state when nothing else holds it.
fn close_if_last(open_files: &Registry, f: Arc<CryptFile>) {
    let mut open = open_files.lock().unwrap();
    if Arc::strong_count(&f) == 1 {
        if let Err(e) = f.close() {
            tracing::warn!("closing {}: {e}", f.name());
        }
        open.retain(|_, w| w.strong_count() > 1 || !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&f)));
    }
}

/// Every regular file under `dir` but atrest-fs's own, relative to `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(t) = e.file_type() else { continue };
            if rel.as_os_str().is_empty() && reserved(&e.file_name()) {
                continue;
            }
            let p = rel.join(e.file_name());
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// A mounted tree: the FUSE session (dropping it unmounts), the
/// filesystem's counters, and the tree handle.
pub struct Mounted {
    pub session: fuser::BackgroundSession,
    pub stats: Arc<Stats>,
    pub tree: Tree,
}

/// Mounts the tree in `cipher_dir` at `mountpoint`; the filesystem runs
/// on background threads until the returned session is dropped (which
/// unmounts, writes back every file's state and zeroizes the keys).
pub fn mount(
    cipher_dir: &Path,
    mountpoint: &Path,
    root: RootKey,
    opts: &MountOptions,
) -> Result<Mounted, FsError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(FsError::Mount(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or, in a container, \
             pass the device through (--device /dev/fuse)"
                .into(),
        ));
    }
    // A rotation's scratch copies left by a crash: never switched in.
    let _ = std::fs::remove_dir_all(cipher_dir.join(ROTATE_DIR));
    let fs = AtrestFs::new(cipher_dir.to_path_buf(), root, opts.policy);
    let stats = fs.stats();
    let tree = fs.tree();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("atrest-fs".into()),
        fuser::MountOption::Subtype("atrest".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = opts.threads > 1;
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| {
        FsError::Mount(format!(
            "mounting {} failed: {e} (atrest-fs mounts as root, or needs fusermount3 from the fuse3 package)",
            mountpoint.display()
        ))
    })?;
    Ok(Mounted {
        session,
        stats,
        tree,
    })
}
