//! The SQLite FFI boundary: a VFS shim over SQLite's `unix-excl` VFS.
//!
//! This is the only module of atrest with `unsafe`. It turns SQLite's C
//! callbacks into calls on [`EncryptedFile`] (safe Rust) and implements
//! [`RawFile`] over the underlying unix file.
//!
//! Why `unix-excl` and not `unix`: it takes a process-exclusive lock on the
//! database and keeps the WAL index in heap memory instead of a `-shm` file.
//! A `-shm` file on disk would hold a checksum computed over plaintext WAL
//! frames; in heap memory it never touches the disk. Connections inside one
//! process still share the index, so one server serves many connections.
//!
//! Memory-mapped I/O cannot bypass encryption: the io_methods are version 2,
//! which has no xFetch, so SQLite never maps a file and reads every page
//! through xRead.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;

use atrest_crypto::{DekId, FileKind, WrappedDek};
use rusqlite::ffi;

use crate::file::{EncryptedFile, Fail, RawFile, RotationStatus, SharedFile, Stats};
use crate::keyring::Keyring;
use crate::layout::HEADER_LEN;
use crate::StorageError;

/// What one registered VFS knows. Owned by the VFS (its pAppData).
pub struct VfsState {
    pub name: CString,
    pub keyring: Arc<Keyring>,
    pub stats: Arc<Stats>,
    pub temp_dir: PathBuf,
    underlying: *mut ffi::sqlite3_vfs,
}

/// A registered VFS; unregistered and freed on drop. Every connection
/// using it must be closed first (the engine guarantees that).
pub struct RegisteredVfs {
    vfs: *mut ffi::sqlite3_vfs,
}

// SAFETY of Send/Sync: the pointer is only dereferenced by SQLite (which
// synchronises VFS registration itself) and by Drop.
unsafe impl Send for RegisteredVfs {}
unsafe impl Sync for RegisteredVfs {}

/// In the child of a `fork()`, every infrastructure-layer key made before
/// it stops sealing: the child's copy of its nonce counter would repeat the
/// parent's nonces (docs/CRYPTO.md). Registered once per process.
fn register_fork_guard() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        unsafe extern "C" fn in_child() {
            atrest_crypto::note_fork_in_child();
        }
        // SAFETY: registers a handler that only does one atomic add
        // (async-signal-safe); the function lives for the whole process.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!(rc, "pthread_atfork failed: a forked child would not be stopped from sealing with its parent's infrastructure nonce counter");
        }
    });
}

impl RegisteredVfs {
    pub fn register(
        name: String,
        keyring: Arc<Keyring>,
        stats: Arc<Stats>,
        temp_dir: PathBuf,
    ) -> Result<Self, StorageError> {
        register_fork_guard();
        let underlying_name = CString::new("unix-excl").expect("static name");
        // SAFETY: sqlite3_vfs_find takes a NUL-terminated string and returns
        // a pointer SQLite owns for the life of the process, or null.
        let underlying = unsafe { ffi::sqlite3_vfs_find(underlying_name.as_ptr()) };
        if underlying.is_null() {
            return Err(StorageError::Unsupported {
                path: String::new(),
                what: "this SQLite build has no unix-excl VFS".into(),
            });
        }
        let name = CString::new(name).map_err(|_| StorageError::Unsupported {
            path: String::new(),
            what: "VFS name contains NUL".into(),
        })?;
        let state = Box::new(VfsState {
            name,
            keyring,
            stats,
            temp_dir,
            underlying,
        });
        // SAFETY: `underlying` is a valid VFS (checked non-null above).
        let (sz_os_file, mx_pathname, version) = unsafe {
            (
                (*underlying).szOsFile,
                (*underlying).mxPathname,
                (*underlying).iVersion,
            )
        };
        let z_name = state.name.as_ptr();
        let vfs = Box::new(ffi::sqlite3_vfs {
            iVersion: version.min(3),
            szOsFile: (std::mem::size_of::<AtrestFile>() as c_int) + sz_os_file,
            mxPathname: mx_pathname,
            pNext: ptr::null_mut(),
            zName: z_name,
            pAppData: Box::into_raw(state) as *mut c_void,
            xOpen: Some(x_open),
            xDelete: Some(x_delete),
            xAccess: Some(x_access),
            xFullPathname: Some(x_full_pathname),
            xDlOpen: Some(x_dl_open),
            xDlError: Some(x_dl_error),
            xDlSym: Some(x_dl_sym),
            xDlClose: Some(x_dl_close),
            xRandomness: Some(x_randomness),
            xSleep: Some(x_sleep),
            xCurrentTime: Some(x_current_time),
            xGetLastError: Some(x_get_last_error),
            xCurrentTimeInt64: Some(x_current_time_int64),
            xSetSystemCall: None,
            xGetSystemCall: None,
            xNextSystemCall: None,
        });
        let vfs = Box::into_raw(vfs);
        // SAFETY: `vfs` points to a fully initialised sqlite3_vfs that stays
        // alive until Drop unregisters it.
        let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
        if rc != ffi::SQLITE_OK {
            // SAFETY: registration failed, so SQLite holds no pointer to it;
            // both boxes came from Box::into_raw above.
            unsafe {
                drop(Box::from_raw((*vfs).pAppData as *mut VfsState));
                drop(Box::from_raw(vfs));
            }
            return Err(StorageError::Io {
                path: String::new(),
                code: rc,
            });
        }
        Ok(Self { vfs })
    }
}

impl Drop for RegisteredVfs {
    fn drop(&mut self) {
        // SAFETY: self.vfs was registered in `register`; after unregistering,
        // no new connection can find it, and the engine closes every
        // connection before dropping us, so nothing references it any more.
        unsafe {
            ffi::sqlite3_vfs_unregister(self.vfs);
            drop(Box::from_raw((*self.vfs).pAppData as *mut VfsState));
            drop(Box::from_raw(self.vfs));
        }
    }
}

/// SQLite allocates `szOsFile` bytes for every open file: this struct,
/// followed by the underlying VFS's own file structure.
#[repr(C)]
struct AtrestFile {
    base: ffi::sqlite3_file,
    handle: *mut Handle,
    // Keeps the underlying file 16-byte aligned whatever the pointer size.
    _pad: [u64; 1],
}

struct Handle {
    file: EncryptedFile<Underlying>,
    /// The name we made up for an anonymous temp file (SQLite keeps a
    /// pointer to it while the file is open).
    _temp_name: Option<CString>,
}

/// The underlying unix file, living right after our `AtrestFile`.
pub struct Underlying(*mut ffi::sqlite3_file);

impl Underlying {
    /// # Safety
    /// `f` must be an `AtrestFile` allocated by SQLite with our szOsFile.
    unsafe fn of(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
        // SAFETY: per the contract, the allocation extends past AtrestFile
        // by the underlying VFS's szOsFile.
        unsafe { (f as *mut u8).add(std::mem::size_of::<AtrestFile>()) as *mut ffi::sqlite3_file }
    }

    fn methods(&self) -> &ffi::sqlite3_io_methods {
        // SAFETY: an Underlying exists only for a successfully opened file,
        // whose pMethods the underlying VFS set and keeps valid until close.
        unsafe { &*(*self.0).pMethods }
    }
}

fn rc_result(rc: c_int) -> Result<(), c_int> {
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rc)
    }
}

impl RawFile for Underlying {
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<bool, i32> {
        let read = self.methods().xRead.expect("unix xRead");
        // SAFETY: buf is valid for buf.len() bytes; self.0 is an open file.
        let rc = unsafe {
            read(
                self.0,
                buf.as_mut_ptr() as *mut c_void,
                buf.len() as c_int,
                off as i64,
            )
        };
        match rc {
            ffi::SQLITE_OK => Ok(true),
            ffi::SQLITE_IOERR_SHORT_READ => Ok(false),
            rc => Err(rc),
        }
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), i32> {
        let write = self.methods().xWrite.expect("unix xWrite");
        // SAFETY: buf is valid for buf.len() bytes; self.0 is an open file.
        rc_result(unsafe {
            write(
                self.0,
                buf.as_ptr() as *const c_void,
                buf.len() as c_int,
                off as i64,
            )
        })
    }

    fn truncate(&mut self, size: u64) -> Result<(), i32> {
        let truncate = self.methods().xTruncate.expect("unix xTruncate");
        // SAFETY: self.0 is an open file.
        rc_result(unsafe { truncate(self.0, size as i64) })
    }

    fn size(&mut self) -> Result<u64, i32> {
        let file_size = self.methods().xFileSize.expect("unix xFileSize");
        let mut size: i64 = 0;
        // SAFETY: self.0 is an open file; size is a valid out pointer.
        rc_result(unsafe { file_size(self.0, &mut size) })?;
        Ok(size.max(0) as u64)
    }

    fn sync(&mut self, flags: i32) -> Result<(), i32> {
        let sync = self.methods().xSync.expect("unix xSync");
        // SAFETY: self.0 is an open file.
        rc_result(unsafe { sync(self.0, flags) })
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // Version 2: shared memory yes, memory mapping (xFetch) no.
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

/// # Safety
/// `vfs` must be a VFS registered by [`RegisteredVfs::register`].
unsafe fn state<'a>(vfs: *mut ffi::sqlite3_vfs) -> &'a VfsState {
    // SAFETY: pAppData is the Box<VfsState> leaked in register; it lives
    // until the VFS is unregistered.
    unsafe { &*((*vfs).pAppData as *const VfsState) }
}

/// # Safety
/// `f` must be an `AtrestFile` whose open succeeded.
unsafe fn handle<'a>(f: *mut ffi::sqlite3_file) -> &'a mut Handle {
    // SAFETY: x_open sets `handle` before installing our io_methods, and
    // SQLite only calls io_methods on files whose pMethods is ours. SQLite
    // never uses one file from two threads at once.
    unsafe { &mut *(*(f as *mut AtrestFile)).handle }
}

fn report(fail: Fail) -> c_int {
    if let Some(detail) = fail.detail {
        match &detail {
            StorageError::Tampered { .. } | StorageError::Replayed { .. } => {
                tracing::error!(error = %detail, "integrity failure")
            }
            _ => tracing::warn!(error = %detail, "storage failure"),
        }
        crate::set_last_error(fail.rc, detail);
    }
    fail.rc
}

fn kind_of(flags: c_int) -> FileKind {
    if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        FileKind::MainDb
    } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
        FileKind::Wal
    } else if flags & ffi::SQLITE_OPEN_MAIN_JOURNAL != 0 {
        FileKind::Journal
    } else if flags & ffi::SQLITE_OPEN_SUPER_JOURNAL != 0 {
        FileKind::SuperJournal
    } else {
        FileKind::Temp
    }
}

/// The database a journal, WAL or super-journal belongs to.
fn parent_path(kind: FileKind, path: &str) -> Option<String> {
    match kind {
        FileKind::Wal => path.strip_suffix("-wal").map(str::to_string),
        FileKind::Journal => path.strip_suffix("-journal").map(str::to_string),
        FileKind::SuperJournal => path.rfind("-mj").map(|i| path[..i].to_string()),
        _ => None,
    }
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite passes our registered VFS and a zeroed block of
    // szOsFile bytes for `file`.
    let state = unsafe { state(vfs) };
    let af = file as *mut AtrestFile;
    // SAFETY: `af` points to writable memory of at least AtrestFile size.
    unsafe {
        (*af).base.pMethods = ptr::null();
        (*af).handle = ptr::null_mut();
    }
    let kind = kind_of(flags);
    state.stats.count_open(flags);
    let mut flags = flags;
    // Anonymous temp files get a name in our temp directory, deleted at open.
    let temp_name = if z_name.is_null() {
        let id = atrest_crypto::random_id()
            .map(hex::encode)
            .unwrap_or_default();
        let name = state.temp_dir.join(format!("atrest-tmp-{id}"));
        flags |=
            ffi::SQLITE_OPEN_DELETEONCLOSE | ffi::SQLITE_OPEN_CREATE | ffi::SQLITE_OPEN_READWRITE;
        CString::new(name.to_string_lossy().into_owned()).ok()
    } else {
        None
    };
    let name_ptr: *const c_char = match &temp_name {
        Some(n) => n.as_ptr(),
        None => z_name,
    };
    if name_ptr.is_null() {
        return ffi::SQLITE_CANTOPEN;
    }
    // SAFETY: `file` was allocated with our szOsFile, so the underlying
    // file fits after AtrestFile.
    let sub = unsafe { Underlying::of(file) };
    // SAFETY: the underlying VFS is valid; sub has room for its file; the
    // name is NUL-terminated and outlives the open file (SQLite's own name,
    // or temp_name which the Handle keeps).
    let rc = unsafe {
        let open = (*state.underlying).xOpen.expect("unix xOpen");
        open(state.underlying, name_ptr, sub, flags, out_flags)
    };
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    // SAFETY: name_ptr is a valid NUL-terminated string (see above).
    let path = unsafe { CStr::from_ptr(name_ptr) }
        .to_string_lossy()
        .into_owned();
    let mut raw = Underlying(sub);
    // What the unix VFS actually opened: it falls back to read-only.
    let opened = if out_flags.is_null() {
        flags
    } else {
        // SAFETY: SQLite passed a valid out pointer, which the underlying
        // xOpen just filled in.
        unsafe { *out_flags }
    };
    let writable = opened & ffi::SQLITE_OPEN_READWRITE != 0;
    let shared = if kind == FileKind::Temp {
        SharedFile::temp(path, state.keyring.infra().is_some())
    } else {
        let parent = parent_path(kind, &path).and_then(|p| state.keyring.find_open(&p));
        state.keyring.shared_file(&path, || {
            SharedFile::open(
                &mut raw,
                kind,
                path.clone(),
                &state.keyring,
                parent.as_deref(),
                writable,
            )
        })
    };
    match shared {
        Ok(shared) => {
            let h = Box::new(Handle {
                file: EncryptedFile::new(raw, shared, Arc::clone(&state.stats)),
                _temp_name: temp_name,
            });
            // SAFETY: af is valid (see above); installing pMethods last makes
            // SQLite call x_close (which frees the handle) from now on.
            unsafe {
                (*af).handle = Box::into_raw(h);
                (*af).base.pMethods = &IO_METHODS;
            }
            ffi::SQLITE_OK
        }
        Err(fail) => {
            // SAFETY: the underlying open succeeded, so close it; SQLite will
            // not call our x_close because pMethods is still null.
            unsafe {
                if let Some(close) = (*(*sub).pMethods).xClose {
                    close(sub);
                }
            }
            report(fail)
        }
    }
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    // SAFETY: our VFS and a NUL-terminated name from SQLite.
    let state = unsafe { state(vfs) };
    let path = unsafe { CStr::from_ptr(z_name) }.to_string_lossy();
    state.keyring.forget(&path);
    // SAFETY: pass-through to the underlying VFS with SQLite's arguments.
    unsafe {
        ((*state.underlying).xDelete.expect("unix xDelete"))(state.underlying, z_name, sync_dir)
    }
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    flags: c_int,
    res_out: *mut c_int,
) -> c_int {
    // SAFETY: our VFS and SQLite's arguments, passed through.
    let state = unsafe { state(vfs) };
    let rc = unsafe {
        ((*state.underlying).xAccess.expect("unix xAccess"))(
            state.underlying,
            z_name,
            flags,
            res_out,
        )
    };
    if rc == ffi::SQLITE_OK && flags == ffi::SQLITE_ACCESS_EXISTS {
        // A file holding only our header is empty to SQLite, as a 0-byte
        // file is to the unix VFS.
        // SAFETY: NUL-terminated name from SQLite; res_out is valid.
        let path = unsafe { CStr::from_ptr(z_name) }.to_string_lossy();
        if let Ok(meta) = std::fs::metadata(&*path) {
            if meta.is_file() && meta.len() <= HEADER_LEN {
                unsafe { *res_out = 0 };
            }
        }
    }
    rc
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    n_out: c_int,
    z_out: *mut c_char,
) -> c_int {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xFullPathname.expect("unix xFullPathname"))(u, z_name, n_out, z_out) }
}

unsafe extern "C" fn x_dl_open(vfs: *mut ffi::sqlite3_vfs, z: *const c_char) -> *mut c_void {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xDlOpen.expect("unix xDlOpen"))(u, z) }
}

unsafe extern "C" fn x_dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, z: *mut c_char) {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xDlError.expect("unix xDlError"))(u, n, z) }
}

unsafe extern "C" fn x_dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    h: *mut c_void,
    z: *const c_char,
) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xDlSym.expect("unix xDlSym"))(u, h, z) }
}

unsafe extern "C" fn x_dl_close(vfs: *mut ffi::sqlite3_vfs, h: *mut c_void) {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xDlClose.expect("unix xDlClose"))(u, h) }
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, z: *mut c_char) -> c_int {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xRandomness.expect("unix xRandomness"))(u, n, z) }
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xSleep.expect("unix xSleep"))(u, micros) }
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xCurrentTime.expect("unix xCurrentTime"))(u, out) }
}

unsafe extern "C" fn x_get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    z: *mut c_char,
) -> c_int {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xGetLastError.expect("unix xGetLastError"))(u, n, z) }
}

unsafe extern "C" fn x_current_time_int64(
    vfs: *mut ffi::sqlite3_vfs,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: pass-through with SQLite's arguments.
    let u = unsafe { state(vfs) }.underlying;
    unsafe { ((*u).xCurrentTimeInt64.expect("unix xCurrentTimeInt64"))(u, out) }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls xClose once on a file we opened; we take the
    // handle back from the Box leaked in x_open and close the underlying file.
    unsafe {
        let af = f as *mut AtrestFile;
        let mut h = Box::from_raw((*af).handle);
        if let Err(fail) = h.file.close() {
            // The file closes anyway; the next open only over-counts seals.
            let _ = report(fail);
        }
        (*af).handle = ptr::null_mut();
        let sub = Underlying::of(f);
        let rc = match (*(*sub).pMethods).xClose {
            Some(close) => close(sub),
            None => ffi::SQLITE_OK,
        };
        drop(h);
        rc
    }
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file of ours; SQLite's buffer holds `amt` bytes.
    let (h, buf) = unsafe {
        (
            handle(f),
            std::slice::from_raw_parts_mut(buf as *mut u8, amt as usize),
        )
    };
    match h.file.read(buf, off as u64) {
        Ok(true) => ffi::SQLITE_OK,
        Ok(false) => ffi::SQLITE_IOERR_SHORT_READ,
        Err(fail) => report(fail),
    }
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file of ours; SQLite's buffer holds `amt` bytes.
    let (h, data) = unsafe {
        (
            handle(f),
            std::slice::from_raw_parts(buf as *const u8, amt as usize),
        )
    };
    match h.file.write(data, off as u64) {
        Ok(()) => ffi::SQLITE_OK,
        Err(fail) => report(fail),
    }
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    // SAFETY: an open file of ours.
    let h = unsafe { handle(f) };
    match h.file.truncate(size.max(0) as u64) {
        Ok(()) => ffi::SQLITE_OK,
        Err(fail) => report(fail),
    }
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: an open file of ours.
    let h = unsafe { handle(f) };
    match h.file.sync(flags) {
        Ok(()) => ffi::SQLITE_OK,
        Err(fail) => report(fail),
    }
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut ffi::sqlite3_int64) -> c_int {
    // SAFETY: an open file of ours; `out` is a valid pointer from SQLite.
    let h = unsafe { handle(f) };
    match h.file.file_size() {
        Ok(size) => {
            unsafe { *out = size as i64 };
            ffi::SQLITE_OK
        }
        Err(fail) => report(fail),
    }
}

/// # Safety
/// `f` must be an open file of ours.
unsafe fn sub_methods(
    f: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    // SAFETY: the underlying file is open while ours is; its methods table
    // is a static of the unix VFS.
    unsafe {
        let sub = Underlying::of(f);
        (sub, &*(*sub).pMethods)
    }
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xLock.expect("unix xLock"))(sub, level)
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xUnlock.expect("unix xUnlock"))(sub, level)
    }
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xCheckReservedLock.expect("unix xCheckReservedLock"))(sub, out)
    }
}

/// Our own file-control opcode: rewrap this file's key (see
/// [`rewrap_database`]). SQLite leaves opcodes above 100 to VFSes.
const ATREST_FCNTL_REWRAP: c_int = 0x4154_5201;

/// The argument of [`ATREST_FCNTL_REWRAP`].
struct RewrapRequest<'a> {
    keyring: &'a Keyring,
    /// For a WAL or journal: its database's wrappings, by DEK id.
    parent_wrappings: Vec<(DekId, WrappedDek)>,
    result: Option<Result<Vec<(DekId, WrappedDek)>, Fail>>,
}

/// Sends file-control opcode `op` with `arg` to the main database file
/// of `conn`.
///
/// # Safety
/// `arg` is valid for the call and of the type the opcode's handler
/// (SQLite's, or `x_file_control` for ours) expects.
unsafe fn main_file_control(conn: &rusqlite::Connection, op: c_int, arg: *mut c_void) -> c_int {
    let main = CString::new("main").expect("static name");
    // SAFETY: `conn.handle()` is the live sqlite3* of `conn`, used only for
    // this call on this thread; `arg` is valid per the contract above.
    unsafe { ffi::sqlite3_file_control(conn.handle(), main.as_ptr(), op, arg) }
}

/// Sends our file-control opcode `op` with `arg` to the rollback journal
/// or WAL that the main database of `conn` has open. `None` if it has
/// none open.
///
/// # Safety
/// As for [`main_file_control`].
unsafe fn journal_file_control(
    conn: &rusqlite::Connection,
    op: c_int,
    arg: *mut c_void,
) -> Option<c_int> {
    let mut journal: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: SQLITE_FCNTL_JOURNAL_POINTER is answered by SQLite itself
    // with the pager's journal or WAL file object (or null), which stays
    // valid while `conn` is open and unused by other threads.
    let rc = unsafe {
        main_file_control(
            conn,
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            &mut journal as *mut *mut ffi::sqlite3_file as *mut c_void,
        )
    };
    // SAFETY: a non-null journal pointer is an sqlite3_file SQLite opened
    // through our VFS; pMethods is null while it is closed.
    let methods = unsafe {
        (!journal.is_null())
            .then(|| (*journal).pMethods)
            .filter(|m| !m.is_null())
    };
    match (rc, methods) {
        // SAFETY: the file's own xFileControl (ours), with our opcode and
        // an argument valid per the contract above.
        (ffi::SQLITE_OK, Some(m)) => {
            Some(unsafe { ((*m).xFileControl.expect("xFileControl"))(journal, op, arg) })
        }
        _ => None,
    }
}

/// What a file control that hands back a result left in its request
/// means for the caller: its result, its failure, or (no result at all)
/// a database that is not an atrest file.
fn control_result<T>(result: Option<Result<T, Fail>>, rc: c_int) -> Result<T, StorageError> {
    match result {
        Some(Ok(v)) => Ok(v),
        Some(Err(f)) => Err(f.detail.unwrap_or(StorageError::Io {
            path: "main database".into(),
            code: f.rc,
        })),
        None => Err(StorageError::Unsupported {
            path: "main database".into(),
            what: format!("the database is not an atrest file (file control answered {rc})"),
        }),
    }
}

/// Rewraps the DEK of the main database of `conn` under the keyring's
/// current KEK, then the copy of that wrapping in its WAL's header, through
/// SQLite's own open file handles (opening the files a second time would
/// let a close drop SQLite's POSIX locks). Online: other connections keep
/// reading and writing; no page is touched.
pub fn rewrap_database(
    conn: &rusqlite::Connection,
    keyring: &Keyring,
) -> Result<WrappedDek, StorageError> {
    let mut req = RewrapRequest {
        keyring,
        parent_wrappings: vec![],
        result: None,
    };
    // SAFETY: `req` outlives the call; x_file_control casts the argument
    // of ATREST_FCNTL_REWRAP back to exactly this type.
    let rc = unsafe {
        main_file_control(
            conn,
            ATREST_FCNTL_REWRAP,
            &mut req as *mut RewrapRequest as *mut c_void,
        )
    };
    let wrappings = control_result(req.result.take(), rc)?;
    // The WAL (when open) carries a copy of the database's wrapping.
    let mut req = RewrapRequest {
        keyring,
        parent_wrappings: wrappings.clone(),
        result: None,
    };
    let arg = &mut req as *mut RewrapRequest as *mut c_void;
    // SAFETY: as above.
    if let Some(rc) = unsafe { journal_file_control(conn, ATREST_FCNTL_REWRAP, arg) } {
        control_result(req.result.take(), rc)?;
    }
    wrappings
        .into_iter()
        .next()
        .map(|(_, w)| w)
        .ok_or(StorageError::Io {
            path: "main database".into(),
            code: ffi::SQLITE_MISUSE,
        })
}

/// Our own file-control opcodes for a DEK rotation (see [`rotate_database`]).
const ATREST_FCNTL_ROTATE: c_int = 0x4154_5202;
const ATREST_FCNTL_REKEY_WAL: c_int = 0x4154_5203;

/// One step of a database's DEK rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateOp {
    Status,
    Begin,
    /// Re-seal up to this many pages.
    Step(u64),
    /// Rekey the (empty) WAL, then drop the previous keys.
    Finish,
}

/// The argument of [`ATREST_FCNTL_ROTATE`] and [`ATREST_FCNTL_REKEY_WAL`].
struct RotateRequest<'a> {
    keyring: &'a Keyring,
    op: RotateOp,
    result: Option<Result<Option<RotationStatus>, Fail>>,
}

/// Runs one step of the DEK rotation of the main database of `conn`,
/// through SQLite's own open file handles (see [`rewrap_database`] for
/// why). For [`RotateOp::Finish`] the caller holds SQLite's WAL write lock
/// (`BEGIN IMMEDIATE`) on an empty WAL.
pub fn rotate_database(
    conn: &rusqlite::Connection,
    keyring: &Keyring,
    op: RotateOp,
) -> Result<Option<RotationStatus>, StorageError> {
    if op == RotateOp::Finish {
        let mut req = RotateRequest {
            keyring,
            op,
            result: None,
        };
        let arg = &mut req as *mut RotateRequest as *mut c_void;
        // SAFETY: `req` outlives the call; x_file_control casts the
        // argument of ATREST_FCNTL_REKEY_WAL back to exactly this type.
        if let Some(rc) = unsafe { journal_file_control(conn, ATREST_FCNTL_REKEY_WAL, arg) } {
            if rc != ffi::SQLITE_NOTFOUND {
                control_result(req.result.take(), rc)?;
            }
        }
    }
    let mut req = RotateRequest {
        keyring,
        op,
        result: None,
    };
    // SAFETY: as above, for ATREST_FCNTL_ROTATE.
    let rc = unsafe {
        main_file_control(
            conn,
            ATREST_FCNTL_ROTATE,
            &mut req as *mut RotateRequest as *mut c_void,
        )
    };
    control_result(req.result.take(), rc)
}

/// Answers [`ATREST_FCNTL_ROTATE`] (database) or [`ATREST_FCNTL_REKEY_WAL`].
fn answer_rotate(h: &mut Handle, req: &mut RotateRequest, wal: bool) -> c_int {
    let r = if wal {
        let kind = h.file.shared().kind;
        let parent =
            parent_path(kind, &h.file.shared().path).and_then(|p| req.keyring.find_open(&p));
        match (kind, parent) {
            (FileKind::Wal, Some(parent)) => {
                h.file.rekey_empty_wal(req.keyring, &parent).map(|_| None)
            }
            _ => return ffi::SQLITE_NOTFOUND,
        }
    } else {
        match req.op {
            RotateOp::Status => h.file.rotation(),
            RotateOp::Begin => h.file.rotation_begin(req.keyring).map(Some),
            RotateOp::Step(n) => h.file.rotation_step(n),
            RotateOp::Finish => h.file.rotation_finish(req.keyring).map(|()| None),
        }
    };
    let rc = match &r {
        Ok(_) => ffi::SQLITE_OK,
        Err(fail) => fail.rc,
    };
    req.result = Some(r);
    rc
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    match op {
        ATREST_FCNTL_REWRAP => {
            // SAFETY: only `rewrap_database` sends this opcode, with a
            // `RewrapRequest` that outlives the call; `f` is one of ours.
            let (req, h) = unsafe { (&mut *(arg as *mut RewrapRequest), handle(f)) };
            let kind = h.file.shared().kind;
            if !matches!(kind, FileKind::MainDb | FileKind::Wal | FileKind::Journal) {
                return ffi::SQLITE_NOTFOUND;
            }
            let r = h.file.rewrap(req.keyring, &req.parent_wrappings);
            let rc = match &r {
                Ok(_) => ffi::SQLITE_OK,
                Err(fail) => fail.rc,
            };
            req.result = Some(r);
            rc
        }
        ATREST_FCNTL_ROTATE | ATREST_FCNTL_REKEY_WAL => {
            // SAFETY: only `rotate_database` sends these opcodes, with a
            // `RotateRequest` that outlives the call; `f` is one of ours.
            let (req, h) = unsafe { (&mut *(arg as *mut RotateRequest), handle(f)) };
            answer_rotate(h, req, op == ATREST_FCNTL_REKEY_WAL)
        }
        // The unix VFS would grow the file with zero bytes, which would then
        // read as pages that fail authentication: ignore size hints.
        ffi::SQLITE_FCNTL_SIZE_HINT | ffi::SQLITE_FCNTL_CHUNK_SIZE => ffi::SQLITE_OK,
        // SAFETY: pass-through to the underlying open file.
        _ => unsafe {
            let (sub, m) = sub_methods(f);
            (m.xFileControl.expect("unix xFileControl"))(sub, op, arg)
        },
    }
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xSectorSize.expect("unix xSectorSize"))(sub)
    }
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // Writes are re-sealed units, never atomic appends; only database and
    // WAL units are written whole, so only they keep power-safe overwrite.
    // SAFETY: an open file of ours.
    let kind = unsafe { handle(f) }.file.shared().kind;
    match kind {
        FileKind::MainDb | FileKind::Wal => ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE,
        _ => 0,
    }
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: pass-through to the underlying open file (unix-excl keeps
    // the WAL index in heap memory).
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xShmMap.expect("unix xShmMap"))(sub, region, size, extend, out)
    }
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xShmLock.expect("unix xShmLock"))(sub, offset, n, flags)
    }
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xShmBarrier.expect("unix xShmBarrier"))(sub)
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: pass-through to the underlying open file.
    unsafe {
        let (sub, m) = sub_methods(f);
        (m.xShmUnmap.expect("unix xShmUnmap"))(sub, delete)
    }
}
