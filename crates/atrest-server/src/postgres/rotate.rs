//! DEK rotation of the postgres engine: every file of the cluster's
//! ciphertext tree re-sealed under new DEKs (both layers) while
//! PostgreSQL reads and writes it. The queue, throttle, progress and
//! resume are [`crate::rotation::DekRotator`]'s; this is the engine's part.
//!
//! One target, `cluster`: the tree records when the rotation began
//! ([`atrest_fs::ROTATION_FILE`]), and every file whose DEK is not newer
//! is copied under new DEKs and switched in place (see
//! `atrest_fs::CryptFile::rekey_switch`). A crash loses at most the copy
//! of the file under way; the next start resumes from the record.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrest_fs::{FileRekey, RotationMark, Tree};

use super::Running;
use crate::rotation::{RotationStatus, RotationTarget};

/// The one name a postgres-engine server rotates.
pub const CLUSTER: &str = "cluster";
/// How often the usage-limit check reads every header.
const WORN_CHECK_EVERY: Duration = Duration::from_secs(30);

/// The postgres engine's [`RotationTarget`].
pub struct ClusterRotation {
    running: Arc<Mutex<Option<Running>>>,
    work: Mutex<Work>,
}

#[derive(Default)]
struct Work {
    mark: Option<RotationMark>,
    /// Files still to rotate (popped from the end).
    todo: Vec<PathBuf>,
    /// The file being copied.
    current: Option<FileRekey>,
    /// Units copied, counting those found done at a resume.
    done: u64,
    /// A fresh walk found no file left.
    swept: bool,
    worn_checked: Option<(Instant, u64)>,
}

impl ClusterRotation {
    pub fn new(running: Arc<Mutex<Option<Running>>>) -> Arc<Self> {
        Arc::new(ClusterRotation {
            running,
            work: Mutex::new(Work::default()),
        })
    }

    fn status(w: &Work) -> RotationStatus {
        let mark = w.mark.unwrap_or(RotationMark {
            started_unix: 0,
            units_total: 0,
        });
        let finished = w.swept && w.todo.is_empty() && w.current.is_none();
        // The cluster grows while it rotates: the total is never reached
        // before the last file is switched.
        let total = if finished {
            mark.units_total.max(w.done)
        } else {
            mark.units_total.max(w.done + 1)
        };
        RotationStatus {
            pages_done: if finished { total } else { w.done },
            pages_total: total,
            page_size: atrest_fs::layout::UNIT as u64,
            started_unix: mark.started_unix,
        }
    }

    /// Runs `f` on the mounted tree; `None` when nothing is mounted (the
    /// server is leaving Ready).
    fn with_tree<T>(&self, f: impl FnOnce(&Tree) -> T) -> Option<T> {
        let running = self.running.lock().expect("running");
        running.as_ref().and_then(|r| r.tree()).map(f)
    }
}

fn named(rel: &std::path::Path, e: atrest_fs::FsError) -> String {
    format!("rotating {}: {e}", rel.display())
}

impl RotationTarget for ClusterRotation {
    fn resolve(&self, name: Option<&str>) -> Result<Vec<String>, String> {
        match name {
            None | Some(CLUSTER) => Ok(vec![CLUSTER.into()]),
            Some(n) => Err(format!(
                "the postgres engine rotates the DEKs of every file of the cluster at once, not of database \"{n}\": leave out --database"
            )),
        }
    }

    fn exists(&self, name: &str) -> bool {
        name == CLUSTER
    }

    fn unfinished(&self) -> Vec<String> {
        match self.with_tree(|t| t.rotation()) {
            Some(Some(_)) => vec![CLUSTER.into()],
            _ => vec![],
        }
    }

    fn worn(&self, limit: u64) -> Vec<(String, u64)> {
        let mut w = self.work.lock().expect("rotation work");
        let most = match w.worn_checked {
            Some((at, most)) if at.elapsed() < WORN_CHECK_EVERY => most,
            _ => {
                drop(w);
                let most = self.with_tree(|t| t.most_seals()).unwrap_or(0);
                w = self.work.lock().expect("rotation work");
                w.worn_checked = Some((Instant::now(), most));
                most
            }
        };
        if most >= limit {
            w.worn_checked = None;
            vec![(CLUSTER.into(), most)]
        } else {
            vec![]
        }
    }

    fn begin(&self, _name: &str) -> Result<RotationStatus, String> {
        let running = self.running.lock().expect("running");
        let tree = running
            .as_ref()
            .and_then(|r| r.tree())
            .ok_or("the cluster is not mounted")?;
        let mark = tree.begin_rotation().map_err(|e| e.to_string())?;
        let todo = tree.rotation_pending(mark.started_unix);
        let left: u64 = todo.iter().map(|p| p.1).sum();
        let mut w = self.work.lock().expect("rotation work");
        if let Some(fr) = w.current.take() {
            tree.rekey_abort(fr);
        }
        w.mark = Some(mark);
        w.todo = todo.into_iter().rev().map(|p| p.0).collect();
        w.done = mark.units_total.saturating_sub(left);
        w.swept = false;
        Ok(Self::status(&w))
    }

    fn step(&self, _name: &str, units: u64) -> Result<Option<RotationStatus>, String> {
        let running = self.running.lock().expect("running");
        let mut w = self.work.lock().expect("rotation work");
        let Some(tree) = running.as_ref().and_then(|r| r.tree()) else {
            // Unmounted under us (Inaccessible): the rotator sees the
            // state and waits.
            return Ok(Some(Self::status(&w)));
        };
        let started = w.mark.ok_or("no rotation has begun")?.started_unix;
        let mut budget = units.max(1);
        while budget > 0 {
            if w.current.is_none() {
                let Some(rel) = w.todo.pop() else {
                    if w.swept {
                        break;
                    }
                    let again = tree.rotation_pending(started);
                    if again.is_empty() {
                        w.swept = true;
                        break;
                    }
                    w.todo = again.into_iter().rev().map(|p| p.0).collect();
                    continue;
                };
                match tree.rekey_start(&rel, started) {
                    Ok(Some(fr)) => w.current = Some(fr),
                    Ok(None) => continue,
                    Err(e) => return Err(named(&rel, e)),
                }
            }
            let fr = w.current.as_mut().expect("a file under way");
            match tree.rekey_copy(fr, budget) {
                Ok(0) => {
                    let fr = w.current.take().expect("a file under way");
                    let rel = fr.rel().to_path_buf();
                    tree.rekey_finish(fr).map_err(|e| named(&rel, e))?;
                    // A switch costs fsyncs: it counts against the batch.
                    budget -= 1;
                }
                Ok(n) => {
                    w.done += n;
                    budget = budget.saturating_sub(n);
                }
                Err(e) => {
                    let fr = w.current.take().expect("a file under way");
                    let rel = fr.rel().to_path_buf();
                    tree.rekey_abort(fr);
                    return Err(named(&rel, e));
                }
            }
        }
        Ok(Some(Self::status(&w)))
    }

    fn finish(&self, _name: &str, _ready: &dyn Fn() -> bool) -> Result<bool, String> {
        let running = self.running.lock().expect("running");
        let Some(tree) = running.as_ref().and_then(|r| r.tree()) else {
            return Ok(false);
        };
        let mut w = self.work.lock().expect("rotation work");
        let started = w.mark.ok_or("no rotation has begun")?.started_unix;
        // A file renamed while it was switched is found again here.
        if !tree.rotation_pending(started).is_empty() {
            w.swept = false;
            return Ok(false);
        }
        tree.end_rotation().map_err(|e| e.to_string())?;
        *w = Work::default();
        Ok(true)
    }

    fn park(&self) {
        let current = self.work.lock().expect("rotation work").current.take();
        if let Some(fr) = current {
            // Its copy is dropped (the keys with it); a scratch file left
            // behind is removed at the next mount.
            match self
                .running
                .lock()
                .expect("running")
                .as_ref()
                .and_then(|r| r.tree())
            {
                Some(tree) => tree.rekey_abort(fr),
                None => drop(fr),
            }
        }
    }
}
