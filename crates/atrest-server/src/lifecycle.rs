//! The one server lifecycle, for every engine.
//!
//! A server process has one [`Lifecycle`]: its state (the one
//! [`State`] enum, the same that `state.json` records), which moves between
//! states are allowed ([`allowed`], a pure function), and each move
//! recorded (state.json, the activity log) and announced (webhooks). The
//! sqlite engine's listener and the postgres engine's supervisor both move
//! through it; neither writes state.json itself.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::alerts::Alerts;
use crate::config::ServerConfig;
use crate::resource::{self, Endpoints, State};

/// Whether a running server may move from `from` to `to`.
///
/// ```text
/// Stopped -> Starting -> Ready <-> Inaccessible
///               |          \          /
///               |           Stopping -> Stopped
///               +-> Inaccessible, Stopping or Stopped (start failed)
/// ```
/// (Dropping is entered by `delete`, on a server no process serves.)
pub fn allowed(from: State, to: State) -> bool {
    use State::*;
    matches!(
        (from, to),
        (Stopped, Starting)
            | (Starting, Ready | Inaccessible | Stopping | Stopped)
            | (Ready, Inaccessible | Stopping)
            | (Inaccessible, Ready | Stopping)
            | (Stopping, Stopped)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A move [`allowed`] refuses: a bug in the caller, never applied.
    #[error("the server cannot go from {from} to {to}")]
    Illegal { from: State, to: State },
}

/// The state of the running server, and the one place that moves it.
pub struct Lifecycle {
    dir: PathBuf,
    config: ServerConfig,
    endpoints: Mutex<Endpoints>,
    alerts: Alerts,
    state: tokio::sync::watch::Sender<State>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("server", &self.config.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// A server process begins: Starting ("start requested"), whatever
    /// state.json said before (a killed predecessor leaves Ready behind;
    /// the caller holds the server's lock, so none runs).
    pub fn begin(dir: &Path, config: &ServerConfig) -> Lifecycle {
        let (state, _) = tokio::sync::watch::channel(State::Stopped);
        let l = Lifecycle {
            dir: dir.to_path_buf(),
            config: config.clone(),
            endpoints: Mutex::new(Endpoints::default()),
            alerts: Alerts::new(&config.webhooks),
            state,
        };
        l.transition(State::Starting, "start requested")
            .expect("Stopped -> Starting is allowed");
        l
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Sees every later move.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Where the process serves (recorded in state.json from the next move).
    pub fn set_endpoints(&self, endpoints: Endpoints) {
        *self.endpoints.lock().expect("endpoints") = endpoints;
    }

    /// Moves to `to`: in memory first (so that what reads the state, such
    /// as a connection being admitted, sees it at once), then state.json
    /// and the activity log, then the webhooks. A move that cannot be
    /// recorded (a full disk) still happens, and is logged.
    pub fn transition(&self, to: State, reason: &str) -> Result<(), LifecycleError> {
        let mut from = to;
        let moved = self.state.send_if_modified(|s| {
            from = *s;
            if allowed(*s, to) {
                *s = to;
                true
            } else {
                false
            }
        });
        if !moved {
            tracing::error!(%from, %to, reason, "refused state change");
            return Err(LifecycleError::Illegal { from, to });
        }
        let endpoints =
            (to != State::Stopped).then(|| self.endpoints.lock().expect("endpoints").clone());
        if let Err(e) = resource::set_state(&self.dir, to, reason, endpoints.as_ref()) {
            tracing::error!(error = %e, %to, "cannot record the state change");
        }
        self.alerts.notify(&self.config, to, reason);
        Ok(())
    }

    /// Waits (bounded) for the alerts still being delivered.
    pub async fn drain_alerts(&self, limit: Duration) {
        self.alerts.drain(limit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    const ALL: [State; 6] = [Stopped, Starting, Ready, Stopping, Dropping, Inaccessible];

    #[test]
    fn only_the_documented_moves_are_allowed() {
        let allowed_moves: Vec<(State, State)> = ALL
            .iter()
            .flat_map(|&a| ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| allowed(a, b))
            .collect();
        assert_eq!(
            allowed_moves,
            vec![
                (Stopped, Starting),
                (Starting, Stopped),
                (Starting, Ready),
                (Starting, Stopping),
                (Starting, Inaccessible),
                (Ready, Stopping),
                (Ready, Inaccessible),
                (Stopping, Stopped),
                (Inaccessible, Ready),
                (Inaccessible, Stopping),
            ]
        );
        // Nothing moves to itself, nothing leaves Dropping, and a running
        // server never enters it.
        for s in ALL {
            assert!(!allowed(s, s));
            assert!(!allowed(Dropping, s));
            assert!(!allowed(s, Dropping));
        }
    }

    #[test]
    fn a_refused_move_changes_nothing_and_an_allowed_one_is_recorded() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("srv");
        resource::create(
            &resource::CreateOptions {
                name: "lifecycle-test".into(),
                dir: dir.clone(),
                admin_user: "atrest".into(),
                keystore_dir: Some(t.path().join("ks")),
                ..Default::default()
            },
            &|_, _, _, _| Ok(()),
        )
        .unwrap();
        let config = resource::load_config(&dir).unwrap();
        let l = Lifecycle::begin(&dir, &config);
        assert_eq!(l.state(), Starting);
        let w = l.watch();
        let e = l.transition(Stopped, "x").err();
        assert!(e.is_none(), "Starting -> Stopped is allowed");
        let e = l.transition(Ready, "not from Stopped").unwrap_err();
        assert!(e.to_string().contains("from Stopped to Ready"), "{e}");
        assert_eq!(l.state(), Stopped);
        assert!(w.has_changed().unwrap());
        let rec = resource::load_state(&dir).unwrap();
        assert_eq!(rec.state, Stopped);
        let states: Vec<State> = rec.history.iter().map(|h| h.state).collect();
        // create's Stopped, then this process's two moves.
        assert_eq!(states, vec![Stopped, Starting, Stopped]);
        let log = std::fs::read_to_string(dir.join(resource::ACTIVITY_LOG)).unwrap();
        assert_eq!(log.lines().count(), 3, "{log}");
    }
}
