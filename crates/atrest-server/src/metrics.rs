//! Prometheus metrics of the server: connections, queries, errors by
//! SQLSTATE class, transactions, and the bytes the storage layer encrypted
//! and decrypted.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_rejected: Mutex<BTreeMap<&'static str, u64>>,
    pub auth_failures: AtomicU64,
    pub queries: AtomicU64,
    pub errors: Mutex<BTreeMap<&'static str, u64>>,
    pub commits: AtomicU64,
    pub rollbacks: AtomicU64,
    pub cancels: AtomicU64,
}

impl Metrics {
    pub fn query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, class: &'static str) {
        *self
            .errors
            .lock()
            .expect("metrics")
            .entry(class)
            .or_default() += 1;
    }

    pub fn rejected(&self, reason: &'static str) {
        *self
            .connections_rejected
            .lock()
            .expect("metrics")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn transaction(&self, committed: bool) {
        if committed {
            self.commits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.rollbacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The text exposition format (the state gauge is added by
    /// [`crate::http`], for every engine).
    pub fn render(&self, storage: &atrest_storage::StatsSnapshot) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "atrest_connections_total",
            "Client connections accepted.",
            self.connections_total.load(Ordering::Relaxed),
        );
        counter(
            "atrest_auth_failures_total",
            "Failed authentications.",
            self.auth_failures.load(Ordering::Relaxed),
        );
        counter(
            "atrest_queries_total",
            "Queries and Execute messages processed.",
            self.queries.load(Ordering::Relaxed),
        );
        counter(
            "atrest_transactions_committed_total",
            "Transactions committed.",
            self.commits.load(Ordering::Relaxed),
        );
        counter(
            "atrest_transactions_rolled_back_total",
            "Transactions rolled back.",
            self.rollbacks.load(Ordering::Relaxed),
        );
        counter(
            "atrest_cancel_requests_total",
            "Cancel requests that matched a session.",
            self.cancels.load(Ordering::Relaxed),
        );
        counter(
            "atrest_bytes_encrypted_total",
            "Plaintext bytes sealed by the storage layer.",
            storage.bytes_sealed,
        );
        counter(
            "atrest_bytes_decrypted_total",
            "Plaintext bytes opened (authenticated and decrypted) by the storage layer.",
            storage.bytes_opened,
        );
        counter(
            "atrest_units_encrypted_total",
            "Pages and blocks sealed.",
            storage.units_sealed,
        );
        counter(
            "atrest_units_decrypted_total",
            "Pages and blocks opened.",
            storage.units_opened,
        );
        let _ = writeln!(
            s,
            "# HELP atrest_connections_active Open client sessions.\n# TYPE atrest_connections_active gauge\natrest_connections_active {}",
            self.connections_active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP atrest_errors_total Errors sent to clients, by SQLSTATE class.\n# TYPE atrest_errors_total counter"
        );
        for (class, n) in self.errors.lock().expect("metrics").iter() {
            let _ = writeln!(s, "atrest_errors_total{{class=\"{class}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP atrest_connections_rejected_total Connections refused, by reason.\n# TYPE atrest_connections_rejected_total counter"
        );
        for (reason, n) in self.connections_rejected.lock().expect("metrics").iter() {
            let _ = writeln!(
                s,
                "atrest_connections_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labels() {
        let m = Metrics::default();
        m.query();
        m.query();
        m.error("23");
        m.rejected("too_many_connections");
        let stats = atrest_storage::StatsSnapshot {
            bytes_sealed: 4096,
            ..Default::default()
        };
        let text = m.render(&stats);
        assert!(text.contains("atrest_queries_total 2"));
        assert!(text.contains("atrest_errors_total{class=\"23\"} 1"));
        assert!(
            text.contains("atrest_connections_rejected_total{reason=\"too_many_connections\"} 1")
        );
        assert!(text.contains("atrest_bytes_encrypted_total 4096"));
        assert!(crate::http::state_gauge(crate::resource::State::Ready)
            .contains("atrest_server_state{state=\"Ready\"} 1"));
    }
}
