//! The WAL archive of the sqlite engine: every commit's WAL frames
//! copied, as ciphertext, into `REPO/wal/NAME/SEQ.wal` (see
//! `crate::backup` for why this is consistent), and the helpers the
//! backup shares with it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use atrest_storage::{Engine, HEADER_LEN};

use crate::resource;

/// Frames after which the archiver checkpoints (SQLite's own default).
pub const CHECKPOINT_FRAMES: u64 = 1000;

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

pub(crate) fn private_dir(p: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| err("creating", p, e))
}

pub(crate) fn create_private(p: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| err("creating", p, e))
}

pub(crate) fn sync_dir(p: &Path) {
    if let Ok(d) = File::open(p) {
        let _ = d.sync_all();
    }
}

/// Copies bytes `[from, to)` of `src` to the same offsets of `dst`.
pub(crate) fn copy_range(src: &File, dst: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off)?;
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// One WAL generation being archived.
struct Segment {
    seq: u64,
    salts: u64,
    /// Bytes of the WAL copied so far (a prefix of the file).
    copied: u64,
    image: File,
    commits: File,
}

struct ArchiveState {
    segment: Option<Segment>,
    next_seq: u64,
    /// Backups copying the database file: no checkpoint meanwhile.
    paused: usize,
    wal: Option<File>,
}

/// Copies one database's WAL into the archive as commits happen, and runs
/// its checkpoints. Called with the database's write gate held.
pub struct WalArchiver {
    pub(crate) dir: PathBuf,
    db_path: PathBuf,
    pub(crate) wal_path: PathBuf,
    engine: Engine,
    state: Mutex<ArchiveState>,
    /// Held (write) while a backup copies the database file, and (read)
    /// by each batch of a DEK rotation, which re-seals pages in place.
    pub db_copy: std::sync::RwLock<()>,
}

/// A piece of an archive segment sent to a replica.
pub struct SegmentChunk {
    /// The segment's header region (its keys; rewritten as the WAL's is).
    pub header: Vec<u8>,
    /// Where `data` starts in the segment.
    pub from: u64,
    pub data: Vec<u8>,
    /// The segment's committed length, and the time of that commit.
    pub len: u64,
    pub last_commit_us: u64,
    /// A later segment, if there is one: this one is complete.
    pub newer: Option<u64>,
    /// The newest segment and its committed length.
    pub head: (u64, u64),
    /// The segment was removed (retention, with no replica holding it):
    /// whoever needs it cannot catch up from the archive.
    pub gone: bool,
}

/// The file in a database's archive directory that says where the
/// current incarnation of the database begins (its first segment).
const ORIGIN_FILE: &str = "origin";

/// Records, as a database is created, the archive segment its history
/// starts at: the next one to be made.
pub fn mark_origin(repo: &Path, name: &str) -> Result<(), String> {
    let dir = repo.join("wal").join(name);
    private_dir(&dir)?;
    let next = segments_in(&dir).last().map_or(1, |s| s + 1);
    resource::write_atomic(&dir.join(ORIGIN_FILE), next.to_string().as_bytes(), 0o600)
        .map_err(|e| err("writing", &dir.join(ORIGIN_FILE), e))
}

/// The first segment of database `name`'s current incarnation, if it was
/// created with the archive on.
pub fn origin(repo: &Path, name: &str) -> Option<u64> {
    fs::read_to_string(repo.join("wal").join(name).join(ORIGIN_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Segment numbers present in `dir`, ascending.
pub(crate) fn segments_in(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().into_string().ok()?;
                    n.strip_suffix(".wal")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

pub(crate) fn segment_path(dir: &Path, seq: u64, ext: &str) -> PathBuf {
    dir.join(format!("{seq:020}.{ext}"))
}

impl WalArchiver {
    pub fn new(repo: &Path, name: &str, db_path: PathBuf, engine: Engine) -> Self {
        let dir = repo.join("wal").join(name);
        let next_seq = segments_in(&dir).last().map_or(1, |s| s + 1);
        WalArchiver {
            wal_path: PathBuf::from(format!("{}-wal", db_path.display())),
            dir,
            db_path,
            engine,
            state: Mutex::new(ArchiveState {
                segment: None,
                next_seq,
                paused: 0,
                wal: None,
            }),
            db_copy: std::sync::RwLock::new(()),
        }
    }

    fn open_segment(&self, st: &mut ArchiveState, salts: u64) -> Result<(), String> {
        if let Some(old) = st.segment.take() {
            let _ = old.image.sync_all();
            let _ = old.commits.sync_all();
        }
        private_dir(&self.dir)?;
        // With no backup to replay them onto, older segments serve no
        // restore: keep the archive from growing without bound.
        let repo = self.dir.parent().and_then(Path::parent);
        if repo.is_some_and(|r| !catalog_path(r).exists()) {
            for old in segments_in(&self.dir) {
                let _ = fs::remove_file(segment_path(&self.dir, old, "wal"));
                let _ = fs::remove_file(segment_path(&self.dir, old, "commits"));
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let image = create_private(&segment_path(&self.dir, seq, "wal"))?;
        let commits = create_private(&segment_path(&self.dir, seq, "commits"))?;
        sync_dir(&self.dir);
        st.wal = Some(File::open(&self.wal_path).map_err(|e| err("opening", &self.wal_path, e))?);
        st.segment = Some(Segment {
            seq,
            salts,
            copied: 0,
            image,
            commits,
        });
        Ok(())
    }

    /// Copies what was committed since the last call into the archive
    /// (and the WAL's header region, which the engine rewrites at syncs and
    /// key changes), records the commit time, and checkpoints once the WAL
    /// is long. The caller holds the write gate and no transaction.
    pub fn after_write(&self, conn: &rusqlite::Connection) -> Result<(), String> {
        let Some(status) = self.engine.wal_status(&self.db_path) else {
            return Ok(());
        };
        let mut st = self.state.lock().expect("archive state");
        if st.segment.as_ref().map(|s| s.salts) != Some(status.salts) {
            if status.committed_frames == 0 {
                return Ok(());
            }
            self.open_segment(&mut st, status.salts)?;
        }
        let st = &mut *st;
        let seg = st.segment.as_mut().expect("segment");
        let wal = st.wal.as_ref().expect("open with the segment");
        if status.committed_len > seg.copied {
            let io = |e| err("archiving", &self.wal_path, e);
            copy_range(wal, &seg.image, 0, HEADER_LEN.min(status.committed_len)).map_err(io)?;
            copy_range(
                wal,
                &seg.image,
                seg.copied.max(HEADER_LEN),
                status.committed_len,
            )
            .map_err(io)?;
            seg.copied = status.committed_len;
            writeln!(seg.commits, "{} {}", status.committed_len, now_us())
                .map_err(|e| err("archiving", &self.dir, e))?;
        }
        if status.committed_frames >= CHECKPOINT_FRAMES && st.paused == 0 {
            // What the checkpoint moves out of the WAL is durable in the
            // archive first.
            let _ = seg.image.sync_data();
            let _ = seg.commits.sync_data();
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .map_err(|e| format!("checkpoint: {e}"))?;
        }
        Ok(())
    }

    /// At start, before any session: archives whatever the WAL holds (a
    /// crash may have ended the process between a commit and its
    /// archiving) as a segment of its own, then checkpoints it all, so the
    /// archive and the WAL start the next generation together.
    pub fn recover(&self, conn: &rusqlite::Connection) -> Result<(), String> {
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
            .map_err(|e| format!("opening: {e}"))?;
        let len = fs::metadata(&self.wal_path).map(|m| m.len()).unwrap_or(0);
        if len > HEADER_LEN {
            let mut st = self.state.lock().expect("archive state");
            self.open_segment(&mut st, 0)?;
            let st = &mut *st;
            let seg = st.segment.as_mut().expect("segment");
            let wal = st.wal.as_ref().expect("open");
            copy_range(wal, &seg.image, 0, len).map_err(|e| err("archiving", &self.wal_path, e))?;
            let mtime = fs::metadata(&self.wal_path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(now_us(), |d| d.as_micros() as u64);
            writeln!(seg.commits, "{len} {mtime}").map_err(|e| err("archiving", &self.dir, e))?;
            seg.copied = len;
            seg.image
                .sync_all()
                .map_err(|e| err("archiving", &self.dir, e))?;
            seg.commits
                .sync_all()
                .map_err(|e| err("archiving", &self.dir, e))?;
            st.segment = None; // the next generation gets a segment of its own
        }
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| format!("checkpoint: {e}"))?;
        Ok(())
    }

    /// Where the archive stands: the segment that holds the current
    /// generation (or the next one to be made).
    pub(crate) fn point(&self) -> u64 {
        let st = self.state.lock().expect("archive state");
        st.segment.as_ref().map_or(st.next_seq, |s| s.seq)
    }

    /// Whether a backup is copying the database file (no checkpoint now).
    pub fn paused(&self) -> bool {
        self.state.lock().expect("archive state").paused > 0
    }

    pub(crate) fn pause(&self) {
        self.state.lock().expect("archive state").paused += 1;
    }

    pub(crate) fn resume(&self) {
        let mut st = self.state.lock().expect("archive state");
        st.paused = st.paused.saturating_sub(1);
    }

    /// Segment `seq` for a replica: its header region and its committed
    /// bytes from `from` (at most `max`), read under the archive's lock so
    /// that no commit is half copied. See [`SegmentChunk`].
    pub fn read_segment(&self, seq: u64, from: u64, max: u64) -> Result<SegmentChunk, String> {
        let _st = self.state.lock().expect("archive state");
        let all = segments_in(&self.dir);
        let newer = all.iter().copied().find(|s| *s > seq);
        let head = match all.last() {
            Some(&last) => (
                last,
                read_commits(&segment_path(&self.dir, last, "commits"))
                    .last()
                    .map_or(0, |c| c.0),
            ),
            None => (seq, 0),
        };
        let commits = read_commits(&segment_path(&self.dir, seq, "commits"));
        let (len, last_commit_us) = commits.last().copied().unwrap_or((0, 0));
        // Missing, with a newer one present: removed, not yet to come.
        let gone = newer.is_some() && !segment_path(&self.dir, seq, "wal").exists();
        let mut chunk = SegmentChunk {
            header: vec![],
            from,
            data: vec![],
            len,
            last_commit_us,
            newer,
            head,
            gone,
        };
        if len == 0 {
            return Ok(chunk);
        }
        let path = segment_path(&self.dir, seq, "wal");
        let f = File::open(&path).map_err(|e| err("opening", &path, e))?;
        let hl = HEADER_LEN.min(len);
        chunk.header = vec![0u8; hl as usize];
        f.read_exact_at(&mut chunk.header, 0)
            .map_err(|e| err("reading", &path, e))?;
        let start = from.max(hl);
        if len > start {
            chunk.from = start;
            chunk.data = vec![0u8; (len - start).min(max) as usize];
            f.read_exact_at(&mut chunk.data, start)
                .map_err(|e| err("reading", &path, e))?;
        }
        Ok(chunk)
    }

    /// Rewraps this database's archived segments (the one being appended
    /// too: its writer waits on the lock).
    pub(crate) fn rewrap(&self, engine: &Engine) -> Result<usize, String> {
        let _st = self.state.lock().expect("archive state");
        rewrap_segments(&self.dir, engine)
    }
}

/// Rewraps the archive segments in `dir` (those with a header); returns
/// how many changed.
pub(crate) fn rewrap_segments(dir: &Path, engine: &Engine) -> Result<usize, String> {
    let mut n = 0;
    for seq in segments_in(dir) {
        let p = segment_path(dir, seq, "wal");
        if fs::metadata(&p).map(|m| m.len()).unwrap_or(0) >= HEADER_LEN
            && engine.rewrap_at_rest(&p).map_err(|e| e.to_string())?
        {
            n += 1;
        }
    }
    Ok(n)
}

/// The backup catalog of a repository (its presence says backups exist).
pub(crate) fn catalog_path(repo: &Path) -> PathBuf {
    repo.join("catalog.json")
}

/// An archive segment's commits: `(bytes of the segment, unix µs)`.
pub(crate) fn read_commits(path: &Path) -> Vec<(u64, u64)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}
